"""Triton extend attention (cached prefix in pages + causal new tokens, several sequences
per launch) against `extend_attention_ref`."""

import random

import pytest
import torch

from brorl.kernels.extend_attention import extend_attention_ref

pytest.importorskip("triton")
from brorl.kernels.extend_attention_triton import (  # noqa: E402
    EXTEND_BLOCK_M,
    extend_attention_triton,
    pack_extend_meta,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_case(rng, prefix_lens, extend_lens, dtype, ps=4, hkv=2, h=4, d=16, device="cpu"):
    need = sum(-(-(c + t) // ps) for c, t in zip(prefix_lens, extend_lens))
    num_pages = need + 5
    kc = torch.randn(num_pages, ps, hkv, d, device=device).to(dtype)
    vc = torch.randn(num_pages, ps, hkv, d, device=device).to(dtype)
    free = list(range(num_pages))
    rng.shuffle(free)
    tables = [torch.tensor([free.pop() for _ in range(-(-(c + t) // ps))], dtype=torch.int64,
                           device=device) for c, t in zip(prefix_lens, extend_lens)]
    q = torch.randn(sum(extend_lens), h, d, device=device).to(dtype)
    return q, kc, vc, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extend_matches_reference_on_ragged_sequences(dtype):
    rng = random.Random(0)
    torch.manual_seed(0)
    # no prefix; one new token after a partial page; a page-multiple prefix with more new
    # tokens than one block; an empty extend; a prefix that is not a page multiple
    prefix_lens = [0, 5, 8, 3, 7]
    extend_lens = [7, 1, EXTEND_BLOCK_M + 9, 0, 4]
    q, kc, vc, tables = make_case(rng, prefix_lens, extend_lens, dtype)
    scale = 0.25
    got = extend_attention_triton(q, kc, vc, tables, prefix_lens, extend_lens, scale)
    want = extend_attention_ref(q.float(), kc.float(), vc.float(), tables, prefix_lens,
                                extend_lens, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


def test_extend_with_one_kv_head_per_query_head():
    rng = random.Random(1)
    torch.manual_seed(1)
    q, kc, vc, tables = make_case(rng, [2], [6], torch.float32, hkv=3, h=3, d=8)
    got = extend_attention_triton(q, kc, vc, tables, [2], [6], 0.3)
    want = extend_attention_ref(q, kc, vc, tables, [2], [6], 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_extend_rejects_bad_metadata():
    rng = random.Random(2)
    q, kc, vc, tables = make_case(rng, [0, 2], [3, 2], torch.float32)
    with pytest.raises(ValueError, match="sum to"):
        extend_attention_triton(q, kc, vc, tables, [0, 2], [3, 3], 0.3)
    with pytest.raises(ValueError, match="differ"):
        extend_attention_triton(q, kc, vc, tables, [0], [3, 2], 0.3)
    with pytest.raises(ValueError, match="dtypes differ"):
        extend_attention_triton(q.half(), kc, vc, tables, [0, 2], [3, 2], 0.3)
    meta = pack_extend_meta(tables, [0, 2], [3, 2], q.device)
    assert meta.cu_seqlens.tolist() == [0, 3] and meta.max_extend == 3


@pytest.mark.gpu
def test_gpu_bf16_extend_at_qwen2_shapes():
    rng = random.Random(3)
    torch.manual_seed(3)
    prefix_lens, extend_lens = [0, 512, 1000, 37], [300, 129, 1, 700]
    q, kc, vc, tables = make_case(rng, prefix_lens, extend_lens, torch.bfloat16, ps=16,
                                  hkv=2, h=12, d=128, device="cuda")
    got = extend_attention_triton(q, kc, vc, tables, prefix_lens, extend_lens, 128 ** -0.5)
    want = extend_attention_ref(q.float(), kc.float(), vc.float(), tables, prefix_lens,
                                extend_lens, 128 ** -0.5)
    torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])
