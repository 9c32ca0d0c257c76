"""The folders engine/, kernels/ and trainer/ are the packages brorl.engine, brorl.kernels and
brorl.trainer, and nothing of ours is importable under a bare top-level name that another
package owns (Hugging Face's `kernels`, which transformers >= 5.25 requires)."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("engine", "kernels", "trainer")
# Optional dependencies a module may need; anything else missing is a packaging bug.
OPTIONAL = {"sglang", "cupy", "ray", "triton", "matplotlib", "reasoning_gym", "math_verify",
            "pyarrow"}


def our_modules() -> list[str]:
    names = []
    for top in TOP_LEVEL:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append("brorl." + ".".join(parts))
    return names


def run_from_root(code: str) -> dict:
    """Run code with the repository root first on sys.path, as pytest and bench/ have it."""
    prog = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code
    out = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_module_imports_as_brorl_and_never_under_a_bare_top_level_name():
    got = run_from_root(f"""
import importlib, json
failed, optional = {{}}, []
for name in {our_modules()!r}:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in {sorted(OPTIONAL)!r}:
            optional.append(name)
        else:
            failed[name] = repr(exc)
ours = {str(ROOT / "kernels")!r}
bare = sorted(m for m in sys.modules if m.split(".")[0] in ("engine", "trainer")
              or (m.split(".")[0] == "kernels"
                  and str(getattr(sys.modules[m], "__file__", None) or "").startswith(ours)))
print(json.dumps(dict(failed=failed, optional=optional, bare=bare)))
""")
    assert got["failed"] == {}
    assert got["bare"] == [], "imported under a bare top-level name: " + ", ".join(got["bare"])
    assert len(got["optional"]) < len(our_modules()) // 4


def test_kernels_has_no_init_so_it_cannot_shadow_another_kernels_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "engine" / "__init__.py").exists()
    assert (ROOT / "trainer" / "__init__.py").exists()


def test_the_cpp_allocator_raises_the_python_packages_out_of_pages():
    from brorl.engine.allocator import OutOfPages
    from brorl.engine.cache_ext import extension_built, make_cache

    if not extension_built():
        pytest.skip("brorl.engine._cache_ext is not built")
    alloc, _, _ = make_cache(num_pages=4, page_size=1, impl="cpp")
    with pytest.raises(OutOfPages, match="need 9 KV pages"):
        alloc.alloc(9)


def test_hugging_face_kernels_and_ours_import_side_by_side():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25)")
    got = run_from_root("""
import json, kernels, transformers
import brorl.kernels.linear, brorl.kernels.sampling
from transformers import LlamaConfig, LlamaForCausalLM
LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2))
print(json.dumps(dict(hf=kernels.__file__, ours=brorl.kernels.linear.__file__)))
""")
    assert not got["hf"].startswith(str(ROOT / "kernels"))
    assert Path(got["ours"]).resolve() == ROOT / "kernels" / "linear.py"


def test_no_script_folder_holds_a_module_named_like_an_installed_package():
    """`python bench/X.py` puts bench/ first on sys.path: a bench/kernels.py hid Hugging
    Face's `kernels` from transformers (ImportError: CUDAProperties) in every bench script
    that builds a model."""
    installed = set(importlib.metadata.packages_distributions())
    for folder in (ROOT, ROOT / "bench"):
        names = {p.stem for p in folder.glob("*.py")} | {
            p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
        assert not names & installed, f"{folder} shadows installed packages: " \
            f"{sorted(names & installed)}"
