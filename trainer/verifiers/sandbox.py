"""Runs untrusted Python (model-written programs) in a throwaway, locked-down process.

Layers, strongest first; `sandbox_isolation()` says which ones this machine supports (it
probes once per process and falls back level by level):
1. Kernel namespaces via util-linux `unshare --user --map-root-user --net --mount`: no
   network (an empty network namespace) and a mount namespace in which every mount is
   made read-only except the sandbox's own temp dir.
2. Resource limits set by the prelude before the program runs: RLIMIT_AS (memory),
   RLIMIT_CPU, RLIMIT_FSIZE (files and captured output), RLIMIT_NOFILE, RLIMIT_CORE and
   optionally RLIMIT_NPROC (void for root, whom the kernel exempts).
3. A Python audit hook (best effort: it stops ordinary code, not a determined attacker)
   that denies process creation (os.fork/exec/system/posix_spawn, subprocess, importing
   _posixsubprocess), sockets, signals to other processes, ctypes calls, native-module
   imports from the sandbox dir, and writes, renames, deletes and directory fds outside it.
   Without namespaces it is the only guard of the network and the filesystem.
The process runs `python -I` in a fresh temp dir (cwd, HOME and TMPDIR) with a minimal
environment, in its own session; on timeout the whole process group is SIGKILLed. Reading
files outside the sandbox is not prevented.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

OUTPUT_CAP_BYTES = 1 << 20

# Runs inside the sandbox as `python -I -c _BOOT PRELUDE root readonly mem cpu fsize nproc
# main.py`. The hook keeps everything it uses in default arguments (immutable; replacing the
# __code__ or __defaults__ of a function compiled from <brorl-sandbox> is denied), so the
# program cannot monkeypatch it.
PRELUDE = r'''
import os, sys

def _readonly_fs(root):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    class Attr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns")]
    def check(ret, what):
        if ret != 0:
            raise OSError(ctypes.get_errno(), "sandbox: " + what + " failed")
    b = root.encode()
    check(libc.mount(None, b"/", None, (1 << 14) | (1 << 18), None), "MS_PRIVATE")
    check(libc.mount(b, b, None, (1 << 12) | (1 << 14), None), "bind mount")
    for path, attr in ((b"/", Attr(1, 0, 0, 0)), (b, Attr(0, 1, 0, 0))):
        # mount_setattr(AT_FDCWD, path, AT_RECURSIVE, {set/clear MOUNT_ATTR_RDONLY})
        check(libc.syscall(442, -100, path, 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)),
              "mount_setattr")
    os.chdir(root)  # the old cwd is the directory under the bind mount, now read-only

def _limit(mem, cpu, fsize, nproc):
    import resource as r
    pairs = ((r.RLIMIT_AS, mem), (r.RLIMIT_FSIZE, fsize), (r.RLIMIT_NPROC, nproc),
             (r.RLIMIT_CORE, 0), (r.RLIMIT_NOFILE, 256))
    for res, val in pairs:
        hard = r.getrlimit(res)[1]
        if val >= 0:
            val = val if hard == r.RLIM_INFINITY else min(val, hard)
            r.setrlimit(res, (val, val))
    r.setrlimit(r.RLIMIT_CPU, (cpu, cpu + 1))

def _install_hook(root):
    def resolve(path, dir_fd=None, _readlink=os.readlink, _getcwd=os.getcwd,
                _fspath=os.fspath, _bytes=bytes, _OSError=OSError, _Perm=PermissionError):
        path = _fspath(path)
        if path.__class__ is _bytes:
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            cwd = dir_fd is None or dir_fd < 0  # the events pass -1 for "no dir_fd"
            base = _getcwd() if cwd else _readlink("/proc/self/fd/%d" % dir_fd)
            path = base + "/" + path
        todo, out, hops = path.split("/")[::-1], [], 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                out = out[:-1]
                continue
            try:
                target = _readlink("/" + "/".join(out + [part]))
            except _OSError:
                out.append(part)
                continue
            hops += 1
            if hops > 40:
                raise _Perm("sandbox: too many symlinks")
            out = [] if target.startswith("/") else out
            todo.extend(target.split("/")[::-1])
        return "/" + "/".join(out)

    denied = frozenset((
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
        "ctypes.cdata/buffer", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "webbrowser.open"))
    # event -> ((index of a path argument, index of its dir_fd argument or -1), ...)
    path_args = (("os.remove", ((0, 1),)), ("os.rmdir", ((0, 1),)), ("os.mkdir", ((0, 2),)),
                 ("os.chmod", ((0, 2),)), ("os.chown", ((0, 3),)), ("os.utime", ((0, 3),)),
                 ("os.truncate", ((0, -1),)), ("os.rename", ((0, 2), (1, 3))),
                 ("os.link", ((1, 3),)), ("os.symlink", ((1, 2),)),
                 ("os.setxattr", ((0, -1),)), ("os.removexattr", ((0, -1),)))
    devices = ("/dev/null", "/dev/stdout", "/dev/stderr", "/proc/self/fd/1", "/proc/self/fd/2")
    write = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def hook(event, args, _root=root + "/", _denied=denied, _path_args=path_args,
             _devices=devices, _write=write, _resolve=resolve, _stat=os.stat, _int=int,
             _isinstance=isinstance, _type=type, _function=type(resolve),
             _Perm=PermissionError, _Import=ImportError, _OSError=OSError):
        if event in _denied or event.startswith("socket."):
            raise _Perm("sandbox: " + event + " is not allowed")
        if event == "open":
            path, mode, flags = args
            if _isinstance(path, _int) or path in _devices:
                return
            inside = (_resolve(path) + "/").startswith(_root)
            if flags & _write and not inside:
                raise _Perm("sandbox: writing outside the sandbox dir is not allowed")
            if mode is None and not inside:  # os.open: no directory fds (for dir_fd=)
                try:
                    is_dir = _stat(path).st_mode & 0o170000 == 0o040000
                except _OSError:
                    is_dir = False
                if is_dir:
                    raise _Perm("sandbox: directory fds outside the sandbox are not allowed")
        elif event == "import":
            if args[0] == "_posixsubprocess":
                raise _Import("sandbox: process creation is not allowed")
            fn = args[1]
            if fn is not None and not fn.endswith((".py", ".pyc")) and (
                    _resolve(fn) + "/").startswith(_root):
                raise _Import("sandbox: native modules from the sandbox dir are not allowed")
        elif event == "ctypes.dlopen":
            if args[0] is not None:
                raise _Perm("sandbox: loading native libraries is not allowed")
        elif event == "object.__setattr__":
            obj, name = args[0], args[1]
            if name in ("__code__", "__defaults__", "__kwdefaults__") and _type(obj) is _function \
                    and obj.__code__.co_filename == "<brorl-sandbox>":
                raise _Perm("sandbox: patching the sandbox is not allowed")
        elif event.startswith(("os.", "shutil.")):
            for name, pairs in _path_args:
                if name == event:
                    for i, j in pairs:
                        path = args[i]
                        dir_fd = args[j] if j >= 0 else None
                        if _isinstance(path, _int) or not (
                                _resolve(path, dir_fd) + "/").startswith(_root):
                            raise _Perm("sandbox: " + event + " outside the sandbox dir")

    sys.addaudithook(hook)

def _main():
    root, readonly, mem, cpu, fsize, nproc, path = sys.argv[2:9]
    if readonly == "1":
        _readonly_fs(root)
    _limit(int(mem), int(cpu), int(fsize), int(nproc))
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    import types
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    sys.argv = [path]
    _install_hook(root)
    return code, module.__dict__

_code, _globals = _main()
del _readonly_fs, _limit, _install_hook, _main
exec(_code, _globals)
'''
_BOOT = "import sys; exec(compile(sys.argv[1], '<brorl-sandbox>', 'exec'))"


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed run ended. `returncode` is negative for a signal (-9 SIGKILL);
    `killed_reason` is "" or one of "timeout", "cpu limit", "file size limit",
    "signal <NAME>"; `pid` is the run's process-group id. Output is capped and decoded
    as UTF-8 with replacement."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str = ""
    pid: int = -1

    @property
    def ok(self) -> bool:
        """Exited by itself with status 0."""
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class IsolationLevel:
    """A command prefix that isolates the sandboxed python (e.g. `unshare ...`), and
    whether the prelude makes the filesystem read-only (needs a mount namespace)."""

    name: str
    prefix: tuple[str, ...]
    readonly_fs: bool


# Runs in flight: process-group id (its leader not yet reaped, so the id is ours) -> temp dir.
_LIVE: dict[int, str] = {}


def run_sandboxed(code: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
                  max_file_mb: int = 16, max_procs: int | None = None,
                  cpu_s: int | None = None, output_cap: int = OUTPUT_CAP_BYTES
                  ) -> SandboxResult:
    """Runs the Python program `code` with `stdin` under the strongest isolation this machine
    supports (see the module docstring). `timeout_s` is wall-clock; `cpu_s` defaults to
    ceil(timeout_s) + 1; `max_file_mb` caps every file the program writes, stdout and stderr
    included; `max_procs` sets RLIMIT_NPROC (None: unchanged; fork is denied anyway).
    The temp dir is removed afterwards."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    cpu = cpu_s if cpu_s is not None else math.ceil(timeout_s) + 1
    limits = (memory_mb << 20, cpu, max_file_mb << 20, -1 if max_procs is None else max_procs)
    return _run(code, stdin, timeout_s, limits, output_cap, _isolation())


@functools.lru_cache(maxsize=1)
def sandbox_startup_s() -> float:
    """Wall time of a sandboxed run of an empty program on this machine (isolation set-up,
    interpreter start and exit): the least of three runs, probed once per process."""
    best = math.inf
    for _ in range(3):
        start = time.monotonic()
        run_sandboxed("", timeout_s=10.0)
        best = min(best, time.monotonic() - start)
    return best


def sandbox_isolation() -> str:
    """The isolation layers `run_sandboxed` uses on this machine (probed once per process)."""
    level = _isolation()
    return f"{level.name} + rlimits + audit hook"


def kill_live_sandboxes() -> None:
    """SIGKILLs the runs still in flight and removes their temp dirs (for a worker being
    shut down)."""
    for pgid, outer in list(_LIVE.items()):
        _killpg(pgid)
        shutil.rmtree(outer, ignore_errors=True)


def _run(code: str, stdin: str, timeout_s: float, limits: tuple[int, int, int, int],
         output_cap: int, level: IsolationLevel) -> SandboxResult:
    outer = tempfile.mkdtemp(prefix="brorl_sbx_")
    try:
        work = os.path.realpath(os.path.join(outer, "work"))
        os.mkdir(work, 0o700)
        main = os.path.join(work, "main.py")
        paths = {name: os.path.join(outer, name) for name in ("stdin", "stdout", "stderr")}
        with open(main, "w", encoding="utf-8") as f:
            f.write(code)
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin)
        argv = [*level.prefix, sys.executable, "-I", "-X", "utf8", "-c", _BOOT, PRELUDE, work,
                "1" if level.readonly_fs else "0", *map(str, limits), main]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                open(paths["stderr"], "wb") as ferr:
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=work,
                                    env=env, start_new_session=True)
        _LIVE[proc.pid] = outer
        try:
            timed_out = not _wait_unreaped(proc.pid, timeout_s)
            _killpg(proc.pid)  # strays too; safe: the unreaped leader pins the group id
        finally:
            _LIVE.pop(proc.pid, None)
            proc.kill()
            proc.wait()
        return SandboxResult(proc.returncode, _read(paths["stdout"], output_cap),
                             _read(paths["stderr"], output_cap), timed_out,
                             _killed_reason(proc.returncode, timed_out), proc.pid)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Waits up to timeout_s for `pid` to exit without reaping it; True if it exited."""
    deadline, pause = time.monotonic() + timeout_s, 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.02)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: str, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")


def _killed_reason(returncode: int, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode >= 0:
        return ""
    sig = -returncode
    if sig == signal.SIGXCPU:
        return "cpu limit"
    if sig == signal.SIGXFSZ:
        return "file size limit"
    name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
    return f"signal {name}"


def isolation_levels() -> list[IsolationLevel]:
    """The isolation levels to try, strongest first; the last needs nothing."""
    levels = []
    unshare = shutil.which("unshare")
    if unshare:
        # No PID namespace: without --fork it forbids threads (clone(CLONE_THREAD) fails
        # once pid_ns_for_children differs), and with --fork python would be the
        # namespace's init, which ignores SIGXCPU/SIGXFSZ and needs a reaper.
        ns = (unshare, "--user", "--map-root-user", "--net")
        levels.append(IsolationLevel("user+net+mount namespaces with a read-only filesystem",
                             (*ns, "--mount"), True))
        levels.append(IsolationLevel("user+net namespaces", ns, False))
    levels.append(IsolationLevel("no namespaces", (), False))
    return levels


def level_works(level: IsolationLevel) -> bool:
    """Whether a trivial program runs under `level` on this machine (namespaces can be
    unavailable: no util-linux, user namespaces disabled, kernel < 5.12 for mount_setattr)."""
    probe = _run("print('ok')", "", 10.0, (512 << 20, 5, 1 << 20, -1), 1024, level)
    return probe.ok and probe.stdout == "ok\n"


@functools.lru_cache(maxsize=1)
def _isolation() -> IsolationLevel:
    """The strongest level that works here, probed once per process."""
    levels = isolation_levels()
    return next((level for level in levels[:-1] if level_works(level)), levels[-1])
