"""Token logprob + entropy from hidden states and the LM head, without the [T, V] logits.

For positions t with hidden states h_t (hidden [T, H]), the LM head weight [V, H] (and an
optional bias [V]) and a temperature:

  z_t       = (h_t W^T + bias) / temperature                  (float32; the product is
                                                               in the inputs' dtype)
  logp_t    = z_t[target_t] - lse_t,  lse_t = logsumexp(z_t)
  entropy_t = lse_t - sum_v softmax(z_t)_v z_t,v

The vocabulary is processed in chunks with an online log-sum-exp (running max m, sum
l = sum exp(z - m) and q = sum exp(z - m) z), so only a [T, chunk] block of logits exists
at a time. The backward (`TokenLogprobFunction`) recomputes each chunk's logits and, for a
loss sum_t a_t logp_t + b_t entropy_t, applies

  d/dz_v = a (1[v = target] - p_v) - b p_v (z_v - lse + entropy)

then d/dlogits = that / temperature into grad hidden (accumulated over chunks in float32),
grad weight and grad bias (per chunk). `token_stats_ref` is the plain-torch forward and the
CPU path; kernels/token_logprob_triton.py holds the fused Triton forward.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 4096  # vocabulary entries per chunk


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           targets: torch.Tensor, temperature: float) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)}"
                         f" and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32/int64 [{hidden.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"dtypes differ: hidden {hidden.dtype}, weight {weight.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _chunk_logits(hidden, weight, bias, v0, v1, temperature):
    b = bias[v0:v1] if bias is not None else None
    return torch.nn.functional.linear(hidden, weight[v0:v1], b).float() / temperature


@torch.no_grad()
def token_stats_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor, temperature: float = 1.0,
                    chunk: int = DEFAULT_CHUNK
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [T], entropy [T], lse [T]), float32, by vocabulary chunks with an online
    log-sum-exp. hidden [T, H], weight [V, H], bias [V] or None, targets int [T]."""
    _check(hidden, weight, bias, targets, temperature)
    T, V = hidden.shape[0], weight.shape[0]
    if bool(((targets < 0) | (targets >= V)).any()):
        raise ValueError(f"targets outside [0, {V})")
    m = torch.full((T,), -torch.inf, device=hidden.device)
    l = torch.zeros(T, device=hidden.device)
    q = torch.zeros(T, device=hidden.device)
    tgt = torch.zeros(T, device=hidden.device)
    for v0 in range(0, V, chunk):
        v1 = min(v0 + chunk, V)
        z = _chunk_logits(hidden, weight, bias, v0, v1, temperature)
        m_new = torch.maximum(m, z.max(-1).values)
        alpha = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        l = l * alpha + e.sum(-1)
        q = q * alpha + (e * z).sum(-1)
        m = m_new
        hit = (targets >= v0) & (targets < v1)
        local = (targets - v0).clamp(0, v1 - v0 - 1)
        tgt = torch.where(hit, z.gather(1, local[:, None].long())[:, 0], tgt)
    lse = m + torch.log(l)
    return tgt - lse, lse - q / l, lse


def _backward_chunked(hidden, weight, bias, targets, lse, entropy, a, b, temperature, chunk,
                      needs):
    T, V = hidden.shape[0], weight.shape[0]
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_w = torch.empty_like(weight) if needs[1] else None
    grad_b = torch.empty_like(bias) if bias is not None and needs[2] else None
    shift = (entropy - lse)[:, None]
    rows = torch.arange(T, device=hidden.device)
    for v0 in range(0, V, chunk):
        v1 = min(v0 + chunk, V)
        z = _chunk_logits(hidden, weight, bias, v0, v1, temperature)
        p = torch.exp(z - lse[:, None])
        g = -p * (a[:, None] + b[:, None] * (z + shift))
        hit = (targets >= v0) & (targets < v1)
        g[rows[hit], (targets[hit] - v0).long()] += a[hit]
        g = (g / temperature).to(weight.dtype)
        if needs[0]:
            grad_h += (g @ weight[v0:v1]).float()
        if grad_w is not None:
            grad_w[v0:v1] = g.t() @ hidden
        if grad_b is not None:
            grad_b[v0:v1] = g.float().sum(0).to(bias.dtype)
    return grad_h.to(hidden.dtype) if needs[0] else None, grad_w, grad_b


class TokenLogprobFunction(torch.autograd.Function):
    """(logp, entropy) with a chunked recomputing backward; impl "torch" or "triton" picks
    the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, impl, chunk):
        if impl == "triton":
            from brorl.kernels.token_logprob_triton import token_stats_triton

            logp, entropy, lse = token_stats_triton(hidden, weight, bias, targets, temperature)
        else:
            logp, entropy, lse = token_stats_ref(hidden, weight, bias, targets, temperature,
                                                 chunk)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        zeros = torch.zeros_like(lse)
        a = g_logp.float() if g_logp is not None else zeros
        b = g_entropy.float() if g_entropy is not None else zeros
        grads = _backward_chunked(hidden, weight, bias, targets, lse, entropy, a, b,
                                  ctx.temperature, ctx.chunk, ctx.needs_input_grad)
        return (*grads, None, None, None, None)


def token_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          impl: str = "auto", chunk: int = DEFAULT_CHUNK
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and entropy per position (float32 [T] each), differentiable in hidden,
    weight and bias. impl: "auto" (Triton on CUDA when triton imports, else torch), "torch"
    or "triton"."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown token logprob impl {impl!r}; supported: auto, torch, triton")
    _check(hidden, weight, bias, targets, temperature)
    if impl == "auto":
        impl = "triton" if hidden.device.type == "cuda" and _triton_available() else "torch"
    return TokenLogprobFunction.apply(hidden, weight, bias, targets, float(temperature), impl,
                                      chunk)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
