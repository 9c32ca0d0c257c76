"""`brorl info` / `python -m brorl.engine.info`: package versions, CUDA and GPU, which optional C++
extensions are built, and which radix cache, allocator, attention backend and sampler an
Engine would use here. Each choice is asked from the function the engine itself calls, so
the report cannot drift from what runs. `--json` prints one JSON object."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata

PACKAGES = ("torch", "triton", "transformers", "numba", "cupy")
NOT_INSTALLED = "not installed"


def package_version(module: str) -> str:
    """Installed version of the distribution that provides `module`, without importing it
    (cupy ships as cupy-cuda12x, cupy-cuda13x, ...)."""
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        pass
    for dist in metadata.packages_distributions().get(module, []):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return NOT_INSTALLED


def _extensions() -> dict[str, bool]:
    from brorl.engine.cache_ext import extension_built
    from brorl.kernels.cascade_cuda import cuda_ext_built
    from brorl.kernels.decode_attention_cpp import attention_ext_built

    return {"brorl.engine._cache_ext": extension_built(),
            "brorl.kernels._attention_ext": attention_ext_built(),
            "brorl.kernels._cuda_ext": cuda_ext_built()}


def _choice(fn, *args) -> str:
    """fn(*args), or the error it raises (a bad BRORL_CACHE_IMPL, say) as text."""
    try:
        return fn(*args)
    except (ValueError, RuntimeError, ImportError) as exc:
        return f"error: {exc}"


def collect(device: str | None = None, dtype: str = "float32") -> dict:
    """Everything `brorl info` reports, as a JSON-able dict. device: the Engine's device
    (default: "cuda" when a GPU is visible, else "cpu"); dtype: its dtype."""
    import torch

    from brorl.engine.attention import default_backend
    from brorl.engine.cache_ext import cache_impl
    from brorl.engine.config import DTYPES
    from brorl.kernels.linear import default_linear_backend
    from brorl.kernels.sampling import _auto_impl

    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else "cpu")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"bad device {device!r}: {exc}") from None
    impl = _choice(cache_impl)
    return {
        "python": platform.python_version(),
        **{name: package_version(name) for name in PACKAGES},
        # the imported build's own string (2.11.0+cu130): a PyPI CUDA wheel's metadata
        # drops the local tag (2.11.0); the key keeps its place in the order above
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "extensions": _extensions(),
        "device": device,
        "dtype": dtype,
        "radix_cache": impl,
        "allocator": impl,  # one factory makes both (brorl.engine.cache_ext.make_cache)
        "attention_backend": _choice(default_backend, torch.device(device),
                                     getattr(torch, dtype)),
        "linear_backend": _choice(default_linear_backend, torch.device(device),
                                  getattr(torch, dtype)),
        "sampler": _choice(_auto_impl, torch.device(device)),
    }


def format_text(info: dict) -> str:
    """Aligned `key: value` lines for people."""
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {'built' if v else 'not built'}" for k, v in value.items())
        lines.append(f"{key + ':':<19} {'none' if value is None else value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m brorl.engine.info` (and `brorl info` through trainer/cli.py)."""
    ap = argparse.ArgumentParser(prog="python -m brorl.engine.info",
                                 description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `info`, shared by `python -m brorl.engine.info` and `brorl info`."""
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--device", default=None,
                    help="the Engine device to report for (default: cuda if visible, else cpu)")
    ap.add_argument("--dtype", default="float32", help="the Engine dtype to report for")


def run(args: argparse.Namespace) -> int:
    """Prints the report for parsed arguments; returns the exit status."""
    try:
        info = collect(args.device, args.dtype)
    except ValueError as err:
        print(f"brorl info: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info) if args.json else format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
