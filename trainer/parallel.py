"""The trainer's data-parallel group: FSDP2 (`torch.distributed.fsdp.fully_shard`) over
trainer ranks, one GPU each on CUDA (NCCL) or one process each on CPU (gloo).

Rank 0 runs the loop (rollouts, verifiers, metrics, evaluation, the weight sync to the
rollout engines); every rank holds a shard of the policy, its optimizer state and, with
KL, of the reference. Each step the kept groups reach every rank (`broadcast_object`),
every rank trains on its share of each mini-batch, and FSDP2 sums the gradients. This
group is the default process group of each trainer process; the weight-sync group is a
separate one (trainer/weight_sync), so the two never mix.

Pickled objects (the step's groups, rank 0's verdicts, metrics) go over a second, gloo
group of the same ranks, on the host: over NCCL, the ranks waiting for rank 0's rollouts
would wait inside a GPU collective (a kernel spinning on the device, under NCCL's watchdog),
and every object would be copied to the GPU and back.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class DataParallel:
    """Where this process sits in the trainer's data-parallel group (1 rank: no group)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"data-parallel rank {self.rank} outside world size "
                             f"{self.world_size}")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's items of a list every rank holds in the same order."""
        return items[self.rank::self.world_size]


SINGLE = DataParallel()

# The host-side group of the trainer's ranks for pickled objects (see the docstring above);
# set by init_group, None without a group.
_objects_group = None


def init_group(rank: int, world_size: int, address: str, device: torch.device,
               timeout_s: float) -> DataParallel:
    """Joins the trainers' process group at `address` ("host:port"): NCCL on CUDA, gloo
    on CPU. `timeout_s` bounds how long a rank waits for rank 0 (rollouts and evaluation
    happen there while the others wait)."""
    import torch.distributed as dist

    global _objects_group
    dp = DataParallel(rank, world_size)
    if dp.enabled:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank,
                                world_size=world_size, timeout=timeout)
        _objects_group = dist.new_group(backend="gloo", timeout=timeout)
    return dp


def close_group(dp: DataParallel) -> None:
    import torch.distributed as dist

    global _objects_group
    if dp.enabled and dist.is_initialized():
        dist.destroy_process_group()  # every group, the objects' one too
    _objects_group = None


def shard(model: torch.nn.Module, dp: DataParallel, device: torch.device,
          frozen: bool = False) -> torch.nn.Module:
    """FSDP2 over the data-parallel group: each decoder layer is one unit, the rest
    (embeddings, final norm, a tied or untied LM head) the root unit. Gradients are summed
    over ranks, not averaged: every rank's loss is already divided by the token count of
    the whole mini-batch. `frozen` (a KL reference, run under no_grad): the root reshards
    after its forward too, as no backward would."""
    if not dp.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from brorl.trainer.policy import SCORER_ATTR, Scorer

    mesh = init_device_mesh(device.type, (dp.world_size,))
    units = [fully_shard(layer, mesh=mesh) for layer in _decoder_layers(model)]
    scorer = Scorer(model)
    # The root stays gathered from forward to backward: the LM head's chunks are
    # recomputed in backward (activation checkpointing) and read its weight again. A
    # frozen model has no backward, whose hook is what would reshard it: it would stay
    # gathered on every rank for the whole run.
    units.append(fully_shard(scorer, mesh=mesh, reshard_after_forward=frozen))
    for unit in units:  # each unit reduces its own gradients: every one must sum
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled sum
        unit.set_gradient_divide_factor(1.0)
    object.__setattr__(model, SCORER_ATTR, scorer)  # a plain attribute, not a submodule
    return model


def load_sharded_policy(path: str, dp: DataParallel, device: torch.device,
                        frozen: bool = False, checkpointing: bool = False) -> torch.nn.Module:
    """The checkpoint at `path` as a sharded float32 policy, read by rank 0 alone (the other
    ranks' `path` is not read). They build the model from rank 0's config with parameters on
    the meta device (no memory), allocate only their shards, and receive the weights by a
    broadcast from rank 0. Collective. `frozen`: a KL reference (eval mode, no gradients).
    `checkpointing`: activation checkpointing of the decoder layers (not for a frozen one)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from brorl.trainer.policy import _no_dropout

    if not dp.enabled:
        raise ValueError("load_sharded_policy needs a data-parallel group; use "
                         "brorl.trainer.policy.load_policy without one")
    model = on_main(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                    dp)
    config = broadcast_object(model.config.to_dict() if dp.is_main else None, dp)
    full, buffers = {}, {}
    if dp.is_main:  # every tensor of the state dict, persistent buffers included
        full = {f"policy.{n}": t.detach() for n, t in model.state_dict().items()}
    else:
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # e.g. RoPE's
    _no_dropout(model)  # as load_policy: the logprobs it trains on must be the policy's
    model.train(not frozen)
    for p in model.parameters():
        p.requires_grad_(not frozen)
    if checkpointing and not frozen:  # before sharding: each layer unit recomputes itself
        from brorl.trainer.policy import enable_checkpointing

        enable_checkpointing(model)
    model = shard(model, dp, device, frozen)
    if not dp.is_main:
        model.to_empty(device=device)  # this rank's shards, still uninitialised
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    # strict: a name rank 0 does not send would stay uninitialised on the other ranks
    set_model_state_dict(_root(model), full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=True))
    return model


@contextmanager
def parameters_on_meta():
    """Every parameter a module registers inside moves to the meta device as it is
    registered (so at most one parameter at a time is ever allocated); buffers stay where
    they are made, so computed ones such as RoPE's inverse frequencies keep their values.
    Patches `nn.Module.register_parameter` for the duration: not for use across threads."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _root(model: torch.nn.Module) -> torch.nn.Module:
    from brorl.trainer.policy import SCORER_ATTR

    return getattr(model, SCORER_ATTR)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no model.layers to shard (FSDP2 expects a "
                         "decoder-only Hugging Face model)")
    return list(layers)


def full_state(model: torch.nn.Module, dp: DataParallel) -> dict[str, torch.Tensor]:
    """Collective when sharded: the full parameters by HF name, on the CPU of rank 0 (an
    empty dict on other ranks); without a group, the parameters themselves."""
    if not dp.enabled:
        return {n: p.detach() for n, p in model.named_parameters()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(_root(model), options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    names = {n for n, _ in model.named_parameters()}  # drops a tied head's second name
    state = {k.removeprefix("policy."): t for k, t in state.items()}
    return {n: t for n, t in state.items() if n in names}


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor],
                    dp: DataParallel) -> None:
    """Collective when sharded: rank 0's full parameters by HF name reach every rank's
    shard (the other ranks pass {}); without a group, a whole state dict as the module's
    own `load_state_dict` takes it."""
    if not dp.enabled:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(_root(model), {f"policy.{k}": v for k, v in state.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False,
                                                  broadcast_from_rank0=True))


def plain_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded CPU model of `model`'s class and config holding the full `state` (for
    checks on rank 0, such as the weight-sync probe)."""
    from transformers import AutoModelForCausalLM

    copy = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    missing, unexpected = copy.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"full state does not fit {type(copy).__name__}: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    return copy


def optimizer_state(model, optimizer, dp: DataParallel) -> dict:
    """Collective when sharded: the optimizer's full state on rank 0 (so a checkpoint
    holds one plain state dict whatever the number of ranks)."""
    if not dp.enabled:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(_root(model), optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, dp: DataParallel) -> None:
    """Collective when sharded: the full state saved by `optimizer_state`, given on rank 0
    (the other ranks pass {}), reaches every rank's shard."""
    if not dp.enabled:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(_root(model), optimizer, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))


def broadcast_object(obj, dp: DataParallel):
    """Rank 0's `obj` on every rank (pickled; for the step's groups and small messages)."""
    if not dp.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if dp.is_main else None]
    dist.broadcast_object_list(box, src=0, group=_objects())
    return box[0]


def _objects():
    """The gloo group for pickled objects; init_group must have built it."""
    if _objects_group is None:
        raise RuntimeError("no trainer process group: call brorl.trainer.parallel.init_group "
                           "first")
    return _objects_group


class MainRankError(RuntimeError):
    """Raised on the other ranks when rank 0 failed in `on_main`; `kind` is the name of
    the exception type rank 0 raised, `kinds` the names of that type and its bases."""

    def __init__(self, message: str, kind: str, kinds: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.kinds = kinds or (kind,)


def on_main(fn, dp: DataParallel, share: bool = False):
    """Runs `fn()` on rank 0 alone (file reads, building the demo policy), then tells every
    rank how it went, so that an error there is raised on every rank instead of leaving
    the others waiting in their next collective. Returns rank 0's result (`share`: on
    every rank, by broadcast; otherwise None on the other ranks)."""
    if not dp.enabled:
        return fn()
    result, error = None, None
    if dp.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
            error = e
    verdict = broadcast_object(None if error is None else (
        type(error).__name__, str(error), tuple(c.__name__ for c in type(error).__mro__)), dp)
    if error is not None:
        raise error
    if verdict is not None:
        kind, message, kinds = verdict
        raise MainRankError(f"trainer rank 0 failed, so rank {dp.rank} stops too: {kind}: "
                            f"{message}", kind, kinds)
    return broadcast_object(result, dp) if share else result


def all_gather_objects(obj, dp: DataParallel) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dp.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * dp.world_size
    dist.all_gather_object(out, obj, group=_objects())
    return out


def sum_metrics(values: dict[str, float], dp: DataParallel) -> dict[str, float]:
    """Sum over ranks of dicts of floats (collective; a key some rank lacks counts 0 there:
    a rank whose share of a step was empty has no statistics of its own)."""
    if not dp.enabled:
        return values
    total: dict[str, float] = {}
    for part in all_gather_objects(values, dp):
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def total_norm(norm) -> float:
    """A float of what clip_grad_norm_ returns (a DTensor when parameters are sharded)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
