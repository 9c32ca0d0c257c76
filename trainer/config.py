"""The trainer's configuration: one frozen dataclass tree, each section checking its own
values when built. `trainer/config_load.py` fills it from a YAML file plus
`section.key=value` overrides and describes it for `brorl train --help`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


def _f(default, help: str, **kw):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class DemoConfig:
    """The demo policy built when model.path is "demo" (see trainer/demo.py)."""

    task_kwargs: dict = _f({"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
                           "reasoning-gym chain_sum difficulty of the warm start's problems")
    hidden_size: int = _f(128, "model width")
    intermediate_size: int = _f(384, "MLP width")
    num_layers: int = _f(4, "decoder layers")
    num_heads: int = _f(4, "query heads")
    num_kv_heads: int = _f(2, "KV heads (GQA)")
    max_position_embeddings: int = _f(256, "context length")
    sft_examples: int = _f(20000, "worked solutions generated for the warm start")
    sft_steps: int = _f(800, "supervised warm-start steps")
    sft_batch_size: int = _f(64, "warm-start batch size")
    sft_lr: float = _f(3e-3, "warm-start peak learning rate")
    sft_label_smoothing: float = _f(0.0, "warm-start label smoothing")
    sft_cut_short: float = _f(0.65, "fraction of the warm start's worked solutions that "
                               "answer after the first operation (a careless solver's slip)")
    seed: int = _f(1234, "seed of the warm start and of its examples")
    cache_dir: str = _f("~/.cache/brorl/demo", "where built demo checkpoints are kept")

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "sft_examples", "sft_steps", "sft_batch_size")
        if not 0.0 <= self.sft_cut_short <= 1.0:
            raise ValueError(f"demo.sft_cut_short must be in [0, 1], got {self.sft_cut_short}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("demo.num_heads must be a multiple of demo.num_kv_heads")


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f("demo", 'HF checkpoint directory, or "demo" to build the demo policy')
    device: str = _f("auto", '"auto" (cuda when present), "cpu" or "cuda"')
    dtype: str = _f("float32", "engine dtype; the trainer keeps float32 master weights")

    def __post_init__(self) -> None:
        # here, not after the demo's warm start or the policy's loading
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f'model.device must be "auto", "cpu", "cuda" or "cuda:N", got '
                             f"{self.device!r}")
        from brorl.engine.config import DTYPES  # the engine's own list

        _choice(self, "dtype", DTYPES)

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class DataConfig:
    train: str = _f("gym:chain_sum", '"gym:<reasoning-gym dataset>" or a .jsonl/.parquet '
                    "file with prompt and answer")
    gym_kwargs: dict = _f({}, "reasoning-gym dataset options (difficulty); "
                          "data.gym_kwargs.max_terms=3 sets one and keeps the others")
    size: int = _f(10000, "reasoning-gym: number of training problems generated")
    eval: str = _f("", "held-out file or gym:<task> (eval_size of them); empty: eval_size "
                   "problems split off the training set (or more of its gym task)")
    eval_size: int = _f(100, "held-out problems")
    seed: int = _f(0, "seed of dataset generation and of the held-out split (the "
                   "training order follows the top-level seed)")
    verifier: str = _f("auto", 'registry name or "module:function"; "auto": reasoning_gym '
                       'for gym data, the row\'s `verifier`, else "math"')
    chat_template: bool = _f(True, "apply the tokenizer's chat template when it has one")
    system_prompt: str = _f("", 'before each prompt (a system turn with a chat template): '
                            'the text, or "gym:<name>" for reasoning-gym\'s SYSTEM_PROMPTS '
                            '(gym:default asks for <answer> tags); empty: none')

    def __post_init__(self) -> None:
        _positive(self, "size", "eval_size")


@dataclass(frozen=True)
class RolloutConfig:
    n: int = _f(512, "samples per prompt (BroRL: 512)")
    prompts_per_step: int = _f(4, "kept prompt groups per step")
    max_prompts_per_step: int = _f(16, "dynamic sampling gives up after generating this many "
                                   "groups in one step")
    dynamic_sampling: bool = _f(True, "drop groups whose rewards are all equal and refill")
    oversample: bool = _f(False, "dynamic sampling: each refill asks for the missing groups "
                          "over the step's pass rate so far (fewer, larger generate calls); "
                          "passing groups beyond prompts_per_step are dropped, as in DAPO "
                          "(rollout/groups_dropped)")
    temperature: float = _f(1.0, "sampling temperature of rollouts")
    top_p: float = _f(1.0, "nucleus sampling")
    top_k: int = _f(-1, "top-k (-1: off)")
    max_tokens: int = _f(64, "response length cap; truncated responses score 0")
    stop: list | str | None = _f(None, "stop string(s) (e.g. </answer>): a response ends at "
                                 "the token that completes one; the verifier sees its text "
                                 "up to and including the stop string")
    coverage_groups: int = _f(8, "groups per step (the first generated) whose next-token "
                              "mass no sample tried is logged (rollout/unsampled_mass*; "
                              "0: off; the cost grows with distinct samples x the longest "
                              "prefix two distinct ones share)")
    page_size: int = _f(16, "engine KV page size")
    max_kv_tokens: int | None = _f(None, "engine KV pool size (None: 30% of the memory free "
                                   "when the engine starts; set it when several rollout "
                                   "workers share a CPU machine, which cannot see each "
                                   "other's pools)")
    kv_memory_fraction: float = _f(0.3, "with max_kv_tokens None: the share of the memory "
                                   "free when the engine starts that its KV pool takes "
                                   "(embedded: the engine starts before the trainer's "
                                   "model; a rollout worker alone on its GPU can take ~0.85)")
    reserve_ratio: float = _f(1.0, "share of each running sample's remaining max_tokens "
                              "whose KV pages are reserved at admission (1: never preempt; "
                              "lower admits more samples and preempts when the pool runs "
                              "out)")
    attention_backend: str = _f("auto", "engine attention backend")
    merge_identical_samples: bool = _f(True, "engine decode computes samples of a prompt "
                                       "with identical tokens so far once")
    weight_sync_transport: str = _f("auto", 'trainer -> engine weights: "auto" (inprocess '
                                    'embedded; nccl on GPUs / gloo on CPUs with ray) | '
                                    "inprocess | gloo | nccl")
    weight_sync_bucket_mb: int = _f(512, "weight-sync bucket size (MB)")
    weight_sync_timeout_s: float = _f(300.0, "a rollout worker silent this long fails the sync")
    weight_sync_shared_memory: bool = _f(True, "gloo: stage buckets in /dev/shm when trainer "
                                         "and workers share a machine (else TCP)")
    weight_sync_probe: bool = _f(False, "after each sync compare engine and trainer logits on "
                                 "a fixed prompt (weight_sync/probe_max_abs_diff)")
    weight_sync_probe_threshold: float | None = _f(None, "warn above this probe difference "
                                                   "(None: 1e-3 in float32, 0.1 in 16-bit)")

    def __post_init__(self) -> None:
        # n and max_tokens are checked below (n >= 2) and by the engine's SamplingParams
        _positive(self, "prompts_per_step", "page_size", "weight_sync_bucket_mb",
                  "weight_sync_timeout_s")
        _choice(self, "weight_sync_transport", ("auto", "inprocess", "gloo", "nccl"))
        if self.n < 2:
            raise ValueError(f"rollout.n must be >= 2, got {self.n}: every advantage "
                             "estimator here is relative to the prompt's group of samples, "
                             "and a group of one has advantage 0")
        if self.coverage_groups < 0:
            raise ValueError("rollout.coverage_groups must be >= 0 (0: off)")
        if not 0.0 < self.kv_memory_fraction < 1.0:
            raise ValueError(f"rollout.kv_memory_fraction must be in (0, 1), got "
                             f"{self.kv_memory_fraction}")
        if not 0.0 <= self.reserve_ratio <= 1.0:
            raise ValueError(f"rollout.reserve_ratio must be in [0, 1], got "
                             f"{self.reserve_ratio}")
        if self.max_kv_tokens is not None and self.max_kv_tokens < self.page_size:
            raise ValueError(f"rollout.max_kv_tokens={self.max_kv_tokens} must hold at least "
                             f"one page of rollout.page_size={self.page_size} tokens")
        if self.max_prompts_per_step < self.prompts_per_step:
            raise ValueError("rollout.max_prompts_per_step must be >= rollout.prompts_per_step")
        if self.temperature <= 0:
            raise ValueError("rollout.temperature must be > 0 for RL sampling")
        _sampling("rollout", self.sampling)
        from brorl.engine.attention import BACKENDS, LAZY_BACKENDS

        _choice(self, "attention_backend", ("auto", *BACKENDS, *LAZY_BACKENDS))

    @property
    def sampling(self) -> dict:
        """The engine's SamplingParams of a rollout, less its seed."""
        return dict(n=self.n, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, max_tokens=self.max_tokens, **_stop(self.stop))

    @property
    def samples_per_step(self) -> int:
        return self.n * self.prompts_per_step


@dataclass(frozen=True)
class AlgorithmConfig:
    advantage: str = _f("reinforce_pp_baseline", "reinforce_pp_baseline | grpo | dr_grpo | "
                        "rloo")
    loss_agg: str = _f("token-mean", "token-mean | seq-mean-token-mean")
    eps_low: float = _f(0.2, "PPO clip below 1")
    eps_high: float = _f(0.28, "PPO clip above 1 (clip-higher)")
    dual_clip: float | None = _f(None, "dual-clip constant c > 1 for negative advantages")
    num_mini_batches: int = _f(1, "optimizer steps per rollout batch")
    train_samples_per_group: int = _f(0, "0: the loss uses all N samples of a group; k: "
                                      "advantages over all N, the loss over the k with the "
                                      "largest reward variance (max-variance down-sampling)")
    old_logprobs: str = _f("behaviour", '"behaviour": the engine\'s logprobs are the old '
                           'policy; "recompute": a trainer forward before the update')
    kl_coef: float = _f(0.0, "KL(policy || reference) loss coefficient")
    kl_estimator: str = _f("k2", "k1 | k2 | k3; as a loss only k2 has the gradient of "
                           "KL(policy || reference): k1's is zero in expectation, k3's is "
                           "that of KL(reference || policy)")
    kl_clamp: float = _f(10.0, "clamp of the log-ratio inside the KL estimator")
    ref_reset_every: int = _f(0, "copy the policy into the reference every k steps (0: never)")
    reset_optimizer_on_ref_reset: bool = _f(False, "also clear AdamW state at a reset")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient")
    tis: str = _f("none", "importance correction engine->trainer, with "
                  "old_logprobs=recompute: truncate (weights clamped to [tis_low, tis_high]) "
                  "| mask (weights outside zeroed) | none")
    tis_low: float | None = _f(None, "lower bound of the importance weight (None: 0 for "
                               "truncate, Yao et al.'s min(w, tis_high); 0.5 for mask, "
                               "ProRL's)")
    tis_high: float = _f(5.0, "upper bound of the importance weight")
    truncated_reward: float | None = _f(0.0, "reward of a response cut at max_tokens "
                                        "(None: keep the verifier's)")

    def __post_init__(self) -> None:
        _positive(self, "num_mini_batches")
        _nonnegative(self, "ref_reset_every")
        if self.train_samples_per_group < 0:
            raise ValueError("algorithm.train_samples_per_group must be >= 0 (0: all)")
        _choice(self, "old_logprobs", ("behaviour", "recompute"))
        _choice(self, "tis", ("truncate", "mask", "none"))
        if self.tis != "none" and self.old_logprobs == "behaviour":
            raise ValueError(f"algorithm.tis={self.tis} needs algorithm.old_logprobs="
                             "recompute: with behaviour the ratio's denominator is already "
                             "the engine's logprob, so there is no mismatch to correct")
        _choice(self, "kl_estimator", ("k1", "k2", "k3"))
        _choice(self, "loss_agg", ("token-mean", "seq-mean-token-mean"))
        # the checks the loss makes at the first update, made before the first rollout
        from brorl.trainer.algorithms import ESTIMATORS

        _choice(self, "advantage", tuple(sorted(ESTIMATORS)))
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"{_key(self, 'eps_low')} must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0.0:
            raise ValueError(f"{_key(self, 'eps_high')} must be >= 0, got {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"{_key(self, 'dual_clip')} must be > 1 (None: off), got "
                             f"{self.dual_clip}")
        if self.kl_coef < 0.0:
            raise ValueError(f"{_key(self, 'kl_coef')} must be >= 0, got {self.kl_coef}")
        _positive(self, "kl_clamp")
        low, high = self.tis_bounds
        if self.tis != "none" and not 0.0 <= low < high:
            raise ValueError("algorithm.tis_low and tis_high need 0 <= low < high, got "
                             f"low={low}, high={high} (tis_low None: "
                             f"{'0' if self.tis == 'truncate' else '0.5'} for {self.tis})")

    @property
    def tis_bounds(self) -> tuple[float, float]:
        low = self.tis_low if self.tis_low is not None else (0.0 if self.tis == "truncate"
                                                            else 0.5)
        return low, self.tis_high


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _f(1e-4, "AdamW learning rate (before scale_lr)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon (larger: small, noisy gradients take smaller steps)")
    grad_clip: float = _f(1.0, "max global grad norm (0: off)")
    warmup_steps: int = _f(0, "linear warm-up, in optimizer steps (num_mini_batches per "
                           "RL step)")
    schedule: str = _f("constant", "constant | cosine")
    scale_lr: bool = _f(False, "multiply lr by sqrt(samples per step / lr_reference_samples); "
                        "samples drawn (rollout.n x prompts_per_step), also when "
                        "train_samples_per_group trains on fewer")
    lr_reference_samples: int = _f(8192, "samples per step the base lr was tuned for")
    micro_batch_size: int = _f(64, "sequences per forward/backward")
    merge_identical_samples: bool = _f(True, "compute each distinct sample of a mini-batch "
                                       "once, weighted by its count (same loss and gradient)")
    logprob_chunk: int = _f(1024, "tokens per chunk of the LM head's log-softmax")
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer's activations "
                                      "in backward instead of keeping them (same gradients, "
                                      "one more forward; long responses on a GPU need it)")
    tf32: bool = _f(False, "CUDA: the trainer's float32 matmuls on TF32 tensor cores (~7x "
                    "the IEEE float32 rate on Hopper; 10-bit mantissa). Process-wide")

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps", "micro_batch_size", "logprob_chunk", "lr_reference_samples")
        _nonnegative(self, "weight_decay", "grad_clip", "warmup_steps")
        _choice(self, "schedule", ("constant", "cosine"))
        betas = self.betas
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(5, "evaluate every k steps (0: only before and after training)")
    k: int = _f(8, "samples per held-out problem (mean@k, pass@k)")
    temperature: float = _f(0.6, "evaluation temperature (BroRL: 0.6)")
    top_p: float = _f(0.95, "evaluation nucleus sampling (BroRL: 0.95)")
    max_tokens: int = _f(64, "evaluation response cap")
    stop: list | str | None = _f(None, "stop string(s) of evaluation responses (as "
                                 "rollout.stop)")
    greedy: bool = _f(True, "also score one greedy answer per problem (eval/greedy)")

    def __post_init__(self) -> None:
        _positive(self, "k")  # named here: SamplingParams would call it n
        _nonnegative(self, "every")
        _sampling("eval", self.sampling)

    @property
    def sampling(self) -> dict:
        """The engine's SamplingParams of the k samples per problem, less their seed."""
        return dict(n=self.k, temperature=self.temperature, top_p=self.top_p,
                    max_tokens=self.max_tokens, **_stop(self.stop))

    @property
    def greedy_sampling(self) -> dict:
        """The same for the one greedy answer per problem."""
        return {**self.sampling, "n": 1, "temperature": 0.0, "top_p": 1.0}


@dataclass(frozen=True)
class VerifierConfig:
    num_workers: int = _f(2, "verifier processes (0: in-process, no timeouts)")
    timeout_s: float = _f(10.0, "per-sample verifier timeout")

    def __post_init__(self) -> None:
        _positive(self, "timeout_s")
        _nonnegative(self, "num_workers")


@dataclass(frozen=True)
class RayConfig:
    """`launcher: ray`: rollout workers (one engine each) and a trainer as Ray actors."""

    address: str = _f("", '"" starts Ray locally; "auto" or "ray://host:port" joins a cluster')
    num_workers: int = _f(1, "rollout workers (one engine each)")
    gpus_per_worker: float = _f(1.0, "GPUs per rollout worker (on CUDA)")
    num_trainers: int = _f(1, "data-parallel trainer actors; > 1 shards the policy with "
                           "FSDP2 over them (NCCL on GPUs, gloo on CPUs)")
    trainer_gpus: int = _f(1, "GPUs per trainer actor (on CUDA; 1: FSDP2 takes one GPU per "
                           "rank, so more GPUs means more ray.num_trainers)")
    trainer_timeout_s: float = _f(3600.0, "how long trainer ranks wait for rank 0 (its "
                                  "rollouts and evaluation) before failing")
    cpus_per_actor: float = _f(1.0, "CPUs Ray reserves per actor")
    num_cpus: int | None = _f(None, "CPUs of a locally started Ray (None: all)")

    def __post_init__(self) -> None:
        _positive(self, "num_workers", "trainer_gpus", "num_trainers", "trainer_timeout_s")
        if self.gpus_per_worker < 0 or self.cpus_per_actor < 0:
            raise ValueError("ray.gpus_per_worker and ray.cpus_per_actor must be >= 0")
        if self.trainer_gpus > 1:
            raise ValueError(f"ray.trainer_gpus={self.trainer_gpus}: a trainer actor takes "
                             "one GPU; for more, set ray.num_trainers (FSDP2 data parallel)")


@dataclass(frozen=True)
class TrainConfig:
    """The whole run. Sections: model, demo, data, rollout, algorithm, optim, eval,
    verifier, ray; top-level keys below."""

    model: ModelConfig = field(default_factory=ModelConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    launcher: str = _f("embedded", "embedded (one process) | ray (actors; see ray.*)")
    steps: int = _f(10, "RL steps")
    seed: int = _f(0, "seed of sampling, shuffling and initialisation")
    output_dir: str = _f("runs/demo", "run directory (metrics.jsonl, checkpoints, plots)")
    overwrite: bool = _f(False, "start over in an output_dir that already holds a run, "
                         "deleting its checkpoints and metrics (without it, such a "
                         "directory is refused; --resume continues it)")
    checkpoint_every: int = _f(5, "save a checkpoint every k steps (and at the end)")
    keep_checkpoints: int = _f(2, "newest checkpoints kept")
    progress: bool = _f(True, "progress bars")

    def __post_init__(self) -> None:
        _positive(self, "steps", "checkpoint_every", "keep_checkpoints")
        if not str(self.output_dir).strip():
            raise ValueError("output_dir is empty: name the run directory (the run would "
                             "write into the current one)")
        _choice(self, "launcher", ("embedded", "ray"))
        if self.ray.num_trainers > 1 and self.launcher != "ray":
            raise ValueError(f"ray.num_trainers={self.ray.num_trainers} needs launcher=ray "
                             "(the embedded launch is one process)")
        if self.launcher == "ray" and self.model.device.startswith("cuda:"):
            raise ValueError(f"model.device={self.model.device} with launcher=ray: Ray gives "
                             "each actor its GPUs (ray.trainer_gpus, ray.gpus_per_worker); "
                             "use model.device=cuda")
        transport = self.rollout.weight_sync_transport
        if (transport == "inprocess") != (self.launcher == "embedded") and transport != "auto":
            raise ValueError(f"rollout.weight_sync_transport={transport} does not fit "
                             f"launcher={self.launcher} (embedded syncs in-process; ray uses "
                             "gloo or nccl)")

    @property
    def lr(self) -> float:
        """The learning rate after BroRL's sqrt scaling (when optim.scale_lr)."""
        if not self.optim.scale_lr:
            return self.optim.lr
        return self.optim.lr * (self.rollout.samples_per_step
                                / self.optim.lr_reference_samples) ** 0.5


_SECTION_OF = {"ModelConfig": "model", "DemoConfig": "demo", "DataConfig": "data",
               "RolloutConfig": "rollout", "AlgorithmConfig": "algorithm",
               "OptimConfig": "optim", "EvalConfig": "eval", "VerifierConfig": "verifier",
               "RayConfig": "ray"}


def _key(obj, name: str) -> str:
    """The dotted key a user sets, e.g. "eval.k" (not the class name)."""
    section = _SECTION_OF.get(type(obj).__name__)
    return f"{section}.{name}" if section else name


def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"{_key(obj, name)} must be > 0, got {getattr(obj, name)}")


def _nonnegative(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ValueError(f"{_key(obj, name)} must be >= 0, got {getattr(obj, name)}")


def _stop(stop: list | None) -> dict:
    """Stop strings stay in the text the verifier scores (`<answer>..</answer>` parses)."""
    return dict(stop=stop, include_stop_str_in_output=True) if stop else {}


def _sampling(section: str, params: dict) -> None:
    """Checks sampling options as the engine will, so that a bad value fails before the
    policy is built or loaded rather than at the first generate call."""
    from brorl.engine.sampling_params import SamplingParams

    try:
        SamplingParams(**params)
    except ValueError as exc:
        raise ValueError(f"{section}: {exc}") from None


def _choice(obj, name: str, options: tuple) -> None:
    if getattr(obj, name) not in options:
        raise ValueError(f"{_key(obj, name)} must be one of {', '.join(options)}, "
                         f"got {getattr(obj, name)!r}")
