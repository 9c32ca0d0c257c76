"""VerifierPool: scores VerifyItems in worker processes, each item under a wall-clock timeout.

Workers are "spawn" processes (the trainer has imported torch and runs threads, so fork is
unsafe), each with a duplex pipe, fed one item at a time. An item that runs past `timeout_s`
scores VerifyResult(0.0, "timeout") and its worker is killed (SIGTERM: it SIGKILLs its
sandboxed programs and exits; then SIGKILL) and replaced; a verifier that raises gives
"error"; a worker that dies gives "error" and is replaced. Results keep the items' order.
With `num_workers=0` items are scored in-process without timeouts (for debugging).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from brorl.trainer.verifiers.base import VerifyItem, VerifyResult, get_verifier

STARTUP_TIMEOUT_S = 120.0
_READY = "ready"
# Imported by each worker before it reports ready, so that the first item's timeout is not
# spent importing (sympy ~0.5 s, reasoning-gym ~1 s).
WARM_MODULES = ("math_verify", "reasoning_gym")


def verify_one(item: VerifyItem) -> VerifyResult:
    """Runs the item's verifier here: its score, or status "error" when it raises or returns
    something outside [0, 1]."""
    try:
        score = float(get_verifier(item.verifier)(item))
    except Exception as e:  # any verifier failure is a zero reward, never a crash
        return VerifyResult(0.0, "error", f"{type(e).__name__}: {e}"[:1000])
    if not (math.isfinite(score) and 0.0 <= score <= 1.0):
        return VerifyResult(0.0, "error", f"verifier {item.verifier!r} returned {score}")
    return VerifyResult(score, "ok")


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    task: int | None = None  # index of the item in flight
    deadline: float = math.inf  # monotonic time at which the item in flight times out
    started: float = 0.0


class VerifierPool:
    """Scores batches of VerifyItems with `num_workers` processes and a per-item timeout.

    `stats` counts items: "scored" (all of them), "ok", "timeouts", "errors", and
    "restarts" (workers replaced). Use as a context manager or call `close()`.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0,
                 warm_modules: tuple[str, ...] = WARM_MODULES) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self.warm_modules = tuple(warm_modules)
        self.stats = {"scored": 0, "ok": 0, "timeouts": 0, "errors": 0, "restarts": 0}
        self._ctx = mp.get_context("spawn")
        self._workers = [self._start_worker() for _ in range(num_workers)]
        self._closed = False

    def score(self, items: list[VerifyItem]) -> list[VerifyResult]:
        """One VerifyResult per item, in order. Blocks until every item is scored."""
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        if self.num_workers == 0:
            results = [verify_one(item) for item in items]
        else:
            results = self._score_in_workers(items)
        for r in results:
            self.stats["scored"] += 1
            self.stats[{"ok": "ok", "timeout": "timeouts", "error": "errors"}[r.status]] += 1
        return results

    def close(self) -> None:
        """Stops the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            w.proc.join(timeout=2.0)
            _stop(w)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _score_in_workers(self, items: list[VerifyItem]) -> list[VerifyResult]:
        results: list[VerifyResult | None] = [None] * len(items)
        pending = deque(range(len(items)))
        try:
            while pending or any(w.task is not None for w in self._workers):
                for w in self._workers:
                    if w.ready and w.task is None and pending:
                        w.task = pending.popleft()
                        w.deadline = time.monotonic() + self.timeout_s
                        w.conn.send((w.task, items[w.task]))
                self._collect(results)
        except BaseException:
            # Interrupted mid-batch: replace busy workers so no stale result leaks into the
            # next batch.
            for i, w in enumerate(self._workers):
                if w.task is not None:
                    self._replace(i)
            raise
        return results  # type: ignore[return-value]

    def _collect(self, results: list[VerifyResult | None]) -> None:
        """Waits for the next message or deadline; records results, timeouts and deaths."""
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.task is not None]
        deadlines += [w.started + STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        ready = wait([w.conn for w in self._workers], timeout)
        for i, w in enumerate(self._workers):
            if w.conn in ready:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    self._on_death(i, results)
                    continue
                if msg == _READY:
                    w.ready = True
                else:
                    index, result = msg
                    results[index], w.task, w.deadline = result, None, math.inf
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.task is not None and now >= w.deadline:
                results[w.task] = VerifyResult(0.0, "timeout", f"exceeded {self.timeout_s} s")
                self._replace(i)
            elif not w.ready and now >= w.started + STARTUP_TIMEOUT_S:
                raise RuntimeError(f"verifier worker did not start in {STARTUP_TIMEOUT_S} s")

    def _on_death(self, i: int, results: list[VerifyResult | None]) -> None:
        w = self._workers[i]
        w.proc.join(timeout=1.0)
        if not w.ready:
            raise RuntimeError(
                f"verifier worker failed to start (exit code {w.proc.exitcode}; its traceback "
                "is on stderr). Workers are spawned: the main module must be importable and "
                "guard its entry point with `if __name__ == '__main__':`")
        if w.task is not None:
            results[w.task] = VerifyResult(
                0.0, "error", f"verifier worker died (exit code {w.proc.exitcode})")
        self._replace(i)

    def _replace(self, i: int) -> None:
        _stop(self._workers[i])
        self._workers[i] = self._start_worker()
        self.stats["restarts"] += 1

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.warm_modules),
                                 name="brorl-verifier", daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent, started=time.monotonic())


def _stop(w: _Worker) -> None:
    """SIGTERM (the worker kills its sandboxes and exits), then SIGKILL; closes the pipe."""
    if w.proc.is_alive():
        w.proc.terminate()
        w.proc.join(timeout=1.0)
    if w.proc.is_alive():
        w.proc.kill()
        w.proc.join()
    w.conn.close()


def _worker_main(conn: Connection, warm_modules: tuple[str, ...]) -> None:
    """A worker process: scores (index, item) messages until it receives None."""
    from brorl.trainer.verifiers.sandbox import kill_live_sandboxes

    def on_term(signum, frame) -> None:
        kill_live_sandboxes()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for name in warm_modules:
        try:
            __import__(name)
        except ImportError:
            pass
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, item = msg
        conn.send((index, verify_one(item)))
