"""`brorl train --launcher ray`: the trainer and the rollout workers as Ray actors.

The trainer actor runs the embedded loop itself (`brorl.trainer.loop.train`: rollouts, update,
metrics, evaluation, checkpoints) with one change: its engine is a `RayEngines`, which
spreads each `generate` call over the workers (all N samples of a prompt on one worker, so
they share its prefix cache) and whose `update_weights` broadcasts the trainer's weights to
every worker over a dedicated weight-sync group (NCCL on GPUs, gloo on CPUs). The trainer
is rank 0 of that group, worker i is rank i + 1.

With `ray.num_trainers` > 1 there are that many trainer actors, ranks of one FSDP2 data-
parallel group (trainer/parallel.py): rank 0 drives the loop and the workers as above, the
others hold their shards of the policy and train on their share of each step's samples.

Placement: each trainer actor takes `ray.trainer_gpus` (1) GPU and each worker
`ray.gpus_per_worker`; on CPU they take `ray.cpus_per_actor` CPUs each.
Workers load the checkpoint from the same path, so a multi-node run needs a shared
filesystem for `output_dir` and the model.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from brorl.trainer.config import TrainConfig

log = logging.getLogger("brorl")
_ENGINE_SETTINGS = ("page_size",)  # numbers in Engine.stats() that are not counters


def train_ray(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Runs the loop on Ray (starting a local Ray unless ray.address is set); returns what
    `brorl.trainer.loop.train` returns."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("--launcher ray needs Ray: pip install 'ray==2.60.0'") from err
    started = not ray.is_initialized()
    if started:
        if cfg.ray.address:
            ray.init(address=cfg.ray.address)
        else:
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        device = cfg.model.device if cfg.model.device != "auto" else \
            ("cuda" if gpus else "cpu")
        trainer_gpus = cfg.ray.num_trainers * cfg.ray.trainer_gpus
        if device == "cuda" and gpus < trainer_gpus + \
                cfg.ray.num_workers * cfg.ray.gpus_per_worker:
            log.warning("ray: %g GPUs in the cluster for %d trainer + %d x %g worker GPUs; "
                        "actors will wait for resources", gpus, trainer_gpus,
                        cfg.ray.num_workers, cfg.ray.gpus_per_worker)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=device))
        actor = ray.remote(TrainerActor).options(
            num_cpus=cfg.ray.cpus_per_actor,
            num_gpus=cfg.ray.trainer_gpus if device == "cuda" else 0)
        trainers = [actor.remote(cfg.ray.cpus_per_actor) for _ in range(cfg.ray.num_trainers)]
        address = ray.get(trainers[0].group_address.remote())
        results = ray.get([t.train.remote(cfg, resume, rank, len(trainers), address)
                           for rank, t in enumerate(trainers)])
        return results[0]
    finally:
        if started:
            ray.shutdown()


class TrainerActor:
    """The trainer: policy, optimizer, verifiers and metrics; drives the workers."""

    def __init__(self, num_threads: float = 1) -> None:
        torch.set_num_threads(max(1, int(num_threads)))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                            datefmt="%H:%M:%S")
        self.engines: RayEngines | None = None

    def group_address(self) -> str:
        """host:port for the trainers' data-parallel group, on this actor's node."""
        import ray

        from brorl.trainer.weight_sync.channel import free_port

        host = ray.util.get_node_ip_address()
        return f"{host}:{free_port(host)}"

    def train(self, cfg: TrainConfig, resume: str | None, rank: int = 0,
              world_size: int = 1, address: str = "") -> dict:
        """`brorl.trainer.loop.train` with the rollout workers as its engine (rank 0), or as one
        more FSDP2 rank of the trainers' data-parallel group."""
        from brorl.trainer.loop import train
        from brorl.trainer.parallel import close_group, init_group

        def make_engine(path: str, cfg: TrainConfig) -> RayEngines:
            self.engines = RayEngines(path, cfg)
            return self.engines

        device = torch.device(cfg.model.resolved_device)
        if device.type == "cuda":
            torch.cuda.set_device(0)  # the actor sees only its own GPU
        dp = init_group(rank, world_size, address, device, cfg.ray.trainer_timeout_s)
        try:
            return train(cfg, resume, make_engine=make_engine, dp=dp)
        finally:
            if self.engines is not None:
                self.engines.close()
            close_group(dp)


class RolloutWorker:
    """One engine on its own device, and the receiving end of the weight-sync group."""

    def __init__(self, path: str, cfg: TrainConfig, num_threads: float = 1) -> None:
        from brorl.trainer.loop import local_engine

        torch.set_num_threads(max(1, int(num_threads)))
        self.engine = local_engine(path, cfg)
        self.receiver = None

    def ready(self) -> bool:
        """Returns once the engine is built (a constructor's error raises at its caller)."""
        return True

    def join(self, transport: str, host: str, port: int, rank: int, world_size: int,
             timeout_s: float, shared_memory: bool = True) -> None:
        from brorl.trainer.weight_sync import make_receiver

        self.receiver = make_receiver(transport, self.engine, host=host, port=port,
                                      rank=rank, world_size=world_size, timeout_s=timeout_s,
                                      shared_memory=shared_memory)

    def receive(self) -> int:
        return self.receiver.receive()

    def generate(self, prompts: list, params: list):
        return self.engine.generate(prompts, params)

    def probe_logits(self, ids: list[int]) -> torch.Tensor:
        from brorl.trainer.weight_sync.probe import engine_logits

        return engine_logits(self.engine, ids)

    def set_version(self, version: int) -> None:
        self.engine.policy_version = int(version)

    def stats(self) -> dict:
        return self.engine.stats()


class RayEngines:
    """The Engine interface the loop uses (`generate`, `update_weights`, `tokenizer`,
    `policy_version`, `stats`), backed by `ray.num_workers` RolloutWorker actors."""

    def __init__(self, path: str, cfg: TrainConfig) -> None:
        import ray

        from brorl.engine.tokenizer import load_tokenizer
        from brorl.trainer.weight_sync import make_sender
        from brorl.trainer.weight_sync.channel import free_port

        self._ray = ray
        r, rc = cfg.rollout, cfg.ray
        on_gpu = cfg.model.device == "cuda"
        transport = r.weight_sync_transport if r.weight_sync_transport != "auto" else \
            ("nccl" if on_gpu else "gloo")
        worker = ray.remote(RolloutWorker).options(
            num_cpus=rc.cpus_per_actor, num_gpus=rc.gpus_per_worker if on_gpu else 0)
        self.workers = [worker.remote(path, cfg, rc.cpus_per_actor)
                        for _ in range(rc.num_workers)]
        # a worker that cannot start (its model, its KV pool) raises its own error here,
        # not a weight-sync timeout after weight_sync_timeout_s; nor does loading count in it
        ray.get([w.ready.remote() for w in self.workers])
        host = ray.util.get_node_ip_address()
        port = free_port(host)
        world = rc.num_workers + 1
        joins = [w.join.remote(transport, host, port, i + 1, world, r.weight_sync_timeout_s,
                               r.weight_sync_shared_memory)
                 for i, w in enumerate(self.workers)]
        self.sender = make_sender(transport, host=host, port=port, world_size=world,
                                  timeout_s=r.weight_sync_timeout_s,
                                  bucket_bytes=r.weight_sync_bucket_mb << 20,
                                  dtype=cfg.model.dtype, device="cuda" if on_gpu else None,
                                  shared_memory=r.weight_sync_shared_memory)
        ray.get(joins)
        self.tokenizer = load_tokenizer(path)
        self._version = 0
        self.last_sync: dict | None = None  # the sender's statistics of the latest sync
        log.info("ray: %d rollout worker(s), weights over %s", len(self.workers), transport)

    @property
    def policy_version(self) -> int:
        return self._version

    @policy_version.setter
    def policy_version(self, version: int) -> None:
        self._ray.get([w.set_version.remote(version) for w in self.workers])
        self._version = int(version)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list:
        """Like `Engine.generate`: prompt i goes whole (all its samples) to worker
        i mod W; the outputs come back in prompt order."""
        from brorl.engine.inputs import normalize_params, normalize_prompts

        prompts = normalize_prompts(prompts)
        params = normalize_params(sampling_params, len(prompts))
        w = len(self.workers)
        refs = [self.workers[k].generate.remote(prompts[k::w], params[k::w])
                for k in range(min(w, len(prompts)))]
        parts = self._ray.get(refs)
        outs = [None] * len(prompts)
        for k, part in enumerate(parts):
            for j, out in enumerate(part):
                outs[k + j * w] = dataclasses.replace(out, request_id=k + j * w)
        return outs

    def update_weights(self, named_tensors, version: int | None = None) -> None:
        """Broadcasts the weights to every worker; returns when all applied them."""
        version = self._version + 1 if version is None else int(version)
        pending = [w.receive.remote() for w in self.workers]
        self.last_sync = self.sender.send(named_tensors, version)
        self._ray.get(pending)
        self._version = version

    def probe_logits(self, ids: list[int]) -> torch.Tensor:
        """[W, T, vocab] float32 probe logits of every worker's engine."""
        return torch.stack(self._ray.get([w.probe_logits.remote(ids) for w in self.workers]))

    def stats(self) -> dict:
        """Counters summed over the workers (policy_version: the trainer's; settings such
        as page_size, and non-numbers: the first worker's)."""
        total: dict = {}
        for s in self._ray.get([w.stats.remote() for w in self.workers]):
            for k, v in s.items():
                summed = isinstance(v, (int, float)) and not isinstance(v, bool) and \
                    k not in _ENGINE_SETTINGS
                total[k] = total.get(k, 0) + v if summed else total.get(k, v)
        total["policy_version"] = self._version
        return total

    def close(self) -> None:
        """Releases the group and stops the workers."""
        self.sender.close()
        for w in self.workers:
            self._ray.kill(w)
