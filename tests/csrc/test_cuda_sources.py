"""The CUDA sources (csrc/cuda) compile with nvcc for sm_90 whenever nvcc is on the PATH, so
they never rot on CPU-only machines; with a GPU and the built extension, the CUDA cascade
decode, paged decode and merge match the torch references (float32 atol 1e-5, bfloat16 KV
atol 1e-4: both sides attend in float32 over the same bf16 values)."""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from brorl.kernels.decode_attention import cascade_decode_ref, merge_states_ref, paged_decode_ref

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))


def test_there_are_cuda_sources():
    assert {p.name for p in SOURCES} >= {"cascade_decode.cu", "merge_states.cu"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    res = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-std=c++17", f"-I{CUDA_DIR}",
                          str(source), "-o", str(tmp_path / (source.stem + ".o"))],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


def _built():
    from brorl.kernels.cascade_cuda import cuda_ext_built

    return torch.cuda.is_available() and cuda_ext_built()


def _case(dtype, h, hkv, d, seed):
    """Groups of 3, 1 and 40 rows (-1 padded) + 2 ungrouped rows; page size 4; prefixes
    that are and are not page multiples; some empty suffixes."""
    g = torch.Generator().manual_seed(seed)
    ps, num_pages, sizes, plens = 4, 400, [3, 1, 40], [13, 8, 150]
    batch = sum(sizes) + 2
    order = torch.randperm(batch, generator=g).tolist()
    rows, start = [], 0
    for n in sizes:
        rows.append(order[start:start + n] + [-1] * (max(sizes) - n))
        start += n
    pages = torch.randperm(num_pages, generator=g)
    pw = math.ceil(max(plens) / ps)
    slens = torch.tensor([i % 10 for i in range(batch)])
    args = (torch.randn(batch, h, d, generator=g),
            torch.randn(num_pages, ps, hkv, d, generator=g).to(dtype),
            torch.randn(num_pages, ps, hkv, d, generator=g).to(dtype),
            torch.tensor(rows), pages[: 3 * pw].view(3, pw), torch.tensor(plens),
            pages[3 * pw:][: batch * 3].view(batch, 3), slens)
    return tuple(t.cuda() for t in args)


@pytest.mark.gpu
@pytest.mark.skipif(not _built(), reason="needs a GPU and brorl.kernels._cuda_ext")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,hkv,d", [(4, 4, 64), (4, 2, 64), (8, 2, 128), (28, 4, 128)])
def test_cuda_cascade_and_paged_match_ref(dtype, h, hkv, d):
    from brorl.kernels.cascade_cuda import cascade_decode_cuda, paged_decode_cuda

    args = _case(dtype, h, hkv, d, seed=h + d)
    atol = 1e-5 if dtype == torch.float32 else 1e-4
    out = cascade_decode_cuda(*args, 0.1)
    torch.testing.assert_close(out, cascade_decode_ref(*args, 0.1), atol=atol, rtol=1e-4)
    q, kc, vc, sp, sl = args[0], args[1], args[2], args[6], args[7]
    o, lse = paged_decode_cuda(q, kc, vc, sp, sl, 0.1)
    ro, rl = paged_decode_ref(q, kc, vc, sp, sl, 0.1)
    torch.testing.assert_close(o, ro, atol=atol, rtol=1e-4)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    torch.testing.assert_close(lse[rl.isfinite()], rl[rl.isfinite()], atol=atol, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not _built(), reason="needs a GPU and brorl.kernels._cuda_ext")
def test_cuda_merge_states_matches_ref_with_empty_sides():
    from brorl.kernels.cascade_cuda import merge_states_cuda

    g = torch.Generator().manual_seed(0)
    o_a, o_b = torch.randn(2, 6, 4, 80, generator=g).cuda()
    la, lb = torch.randn(2, 6, 4, generator=g).cuda()
    la[0], lb[1], la[2], lb[2] = (float("-inf"),) * 4
    out, lse = merge_states_cuda(o_a, la, o_b, lb)
    ro, rl = merge_states_ref(o_a, la, o_b, lb)
    torch.testing.assert_close(out, ro, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    assert (out[2] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not _built(), reason="needs a GPU and brorl.kernels._cuda_ext")
def test_cuda_launcher_rejects_bad_input():
    from brorl.kernels.cascade_cuda import cascade_decode_cuda

    args = list(_case(torch.float32, 4, 2, 64, seed=1))
    bad = list(args)
    bad[4] = bad[4] + 10_000
    with pytest.raises(IndexError, match="prefix_pages"):
        cascade_decode_cuda(*bad, 0.1)
    bad = list(args)
    bad[1] = bad[1].cpu()
    with pytest.raises(ValueError, match="k_cache"):
        cascade_decode_cuda(*bad, 0.1)
