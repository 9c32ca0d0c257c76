"""The trainer's policy: a Hugging Face `AutoModelForCausalLM`, and token logprobs + entropy
of response tokens computed in chunks of positions (the batch x length x vocab log-softmax
is never built; each chunk's logits are recomputed in backward instead of stored)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def load_policy(path: str, device: str | torch.device = "cpu",
                checkpointing: bool = False):
    """The checkpoint as a float32 (master weights) `AutoModelForCausalLM` in train mode,
    with dropout off: the logprobs it trains on must be the policy's, as the engine's are.
    `checkpointing`: see `enable_checkpointing`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    _no_dropout(model)
    if checkpointing:
        enable_checkpointing(model)
    return model.to(device).train()


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer (transformers' own, non-reentrant):
    a layer's activations are recomputed in backward instead of kept, the same gradients
    for one more forward. Long responses need it on a GPU (about 5.7 MB of float32
    activations a token at Qwen2-1.5B's shapes without it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_matmul_precision(device: torch.device, tf32: bool) -> None:
    """optim.tf32: on CUDA, this process's float32 matmuls run on TF32 tensor cores (10-bit
    mantissa, float32 range and accumulation), about 7x the float32 rate of an H100/H200;
    otherwise in IEEE float32. CPU matmuls are never changed. Process-wide: in the embedded
    loop it also holds for a float32 engine on the same GPU."""
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; the legacy flag mixed in errs
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        matmul.allow_tf32 = tf32


def _no_dropout(model) -> None:
    """Dropout modules get p = 0, and so do the dropout rates that attention layers keep
    as floats (e.g. Qwen2's `attention_dropout`) and the config's."""
    for module in [*model.modules(), model.config]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def pad_batch(seqs: list[list[int]], starts: list[int], pad_id: int, device=None):
    """Right-padded ids [B, L], and for the L-1 next-token positions: targets [B, L-1] and
    the response mask [B, L-1] (True where the target is a response token, i.e. at or
    after its sequence's `start`)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for row, (s, start) in enumerate(zip(seqs, starts)):
        if not 0 < start < len(s):
            raise ValueError(f"sequence {row}: response start {start} outside (0, {len(s)})")
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, start - 1:len(s) - 1] = True
    return ids.to(device), ids[:, 1:].to(device), mask.to(device)


def _chunk_stats(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logprob = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs * logits).sum(-1)
    return torch.stack([logprob, entropy])


def token_logprobs(model, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                   temperature: float = 1.0, chunk: int = 1024,
                   with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) under softmax(logits / temperature), and the entropy of that
    distribution, at the masked positions; both [B, L-1] with zeros elsewhere.

    ids [B, L] right-padded (right padding needs no attention mask under a causal model);
    targets and mask [B, L-1] from `pad_batch`. Positions are processed `chunk` at a time.
    A policy sharded by trainer/parallel.py runs this inside its scorer's forward, where
    FSDP2 gathers the parameters.
    """
    scorer = getattr(model, SCORER_ATTR, None)
    if scorer is not None:
        return scorer(ids, targets, mask, temperature, chunk, with_entropy)
    return _token_logprobs(model, ids, targets, mask, temperature, chunk, with_entropy)


SCORER_ATTR = "_brorl_scorer"


class Scorer(torch.nn.Module):
    """`token_logprobs` as one module call, so that FSDP2 (which gathers a unit's
    parameters in its forward hooks) can wrap the whole computation: the decoder layers
    are units of their own, and this module is the root unit owning the embeddings, the
    final norm and the LM head. Not a submodule of the policy (parameter names stay the
    Hugging Face ones); the policy points to it through SCORER_ATTR."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, ids, targets, mask, temperature, chunk, with_entropy):
        return _token_logprobs(self.policy, ids, targets, mask, temperature, chunk,
                               with_entropy)


def _token_logprobs(model, ids, targets, mask, temperature, chunk, with_entropy):
    # no KV cache: nothing decodes after this forward
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    flat_h = hidden[mask]
    flat_t = targets[mask]
    if _use_triton(flat_h, head.weight):  # fused Triton forward on CUDA, same contract
        from brorl.kernels.token_logprob import token_logprob_entropy

        stats = torch.stack(token_logprob_entropy(flat_h, head.weight, flat_t, head.bias,
                                                  temperature, impl="triton"))
        return _scatter(stats, hidden, mask, with_entropy)
    pieces = []
    for i in range(0, flat_h.shape[0], chunk):
        h, t = flat_h[i:i + chunk], flat_t[i:i + chunk]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_stats, h, head.weight, head.bias, t, temperature,
                                     use_reentrant=False))
        else:
            pieces.append(_chunk_stats(h, head.weight, head.bias, t, temperature))
    stats = torch.cat(pieces, dim=1) if pieces else hidden.new_zeros((2, 0))
    return _scatter(stats, hidden, mask, with_entropy)


def _use_triton(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    if hidden.device.type != "cuda" or hidden.dtype != weight.dtype or hidden.shape[0] == 0:
        return False
    from brorl.kernels.token_logprob import _triton_available

    return _triton_available()


def _scatter(stats, hidden, mask, with_entropy):
    logprobs = hidden.new_zeros(mask.shape, dtype=torch.float32)
    entropy = hidden.new_zeros(mask.shape, dtype=torch.float32)
    logprobs = logprobs.masked_scatter(mask, stats[0])
    entropy = entropy.masked_scatter(mask, stats[1]) if with_entropy else entropy
    return logprobs, entropy


def token_logprobs_ref(model, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: the full log-softmax over every position (tests only)."""
    logits = model(input_ids=ids).logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp * mask, ent * mask

