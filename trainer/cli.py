"""`brorl train | eval | plot | info`: the command-line entry point (argument parsing lives here
only)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from brorl.trainer.config import TrainConfig
from brorl.trainer.config_load import describe, load_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="brorl", description="BroRL: large-N RL for LLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser("train", help="train (default: the shipped CPU demo)",
                       formatter_class=fmt, epilog="config keys (key=value overrides):\n"
                       + describe())
    t.add_argument("--config", default=None, help="YAML file (default: the shipped demo)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a run from its last checkpoint")
    t.add_argument("--launcher", choices=("embedded", "ray"), default=None,
                   help="embedded (one process, the default) or ray (actors; see ray.*)")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    e = sub.add_parser("eval", help="mean@k, pass@k and response length on held-out data",
                       formatter_class=fmt, epilog="config keys:\n" + describe())
    e.add_argument("checkpoint", help="HF checkpoint dir, or a run dir (its last checkpoint)")
    e.add_argument("--config", default=None,
                   help="YAML file (default: the run's config.yaml for a run or its "
                        "checkpoint, else the shipped demo)")
    e.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("plot", help="PNG curves of a run against training time")
    p.add_argument("run_dir", help="a run directory (its metrics.jsonl)")
    p.add_argument("--out", default=None,
                   help="PNG path or directory (default: RUN_DIR/curves.png)")
    i = sub.add_parser("info", help="versions, GPU, built C++ extensions and the engine "
                       "implementations this machine would use")
    _info_arguments(i)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return {"train": _train, "eval": _eval, "plot": _plot,
                "info": _info}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"brorl {args.command}: error: {err}", file=sys.stderr)
        return 2


def _load_config(args, run_dir) -> TrainConfig:
    """--config, else the run's own config.yaml when `run_dir` is a run that has one (as
    --resume and `brorl eval RUN_DIR` use it), else the shipped demo; then the overrides."""
    from brorl.trainer.checkpoint import RUN_CONFIG

    saved = Path(run_dir) / RUN_CONFIG if run_dir else None
    if args.config is None and saved is not None and saved.is_file():
        logging.getLogger("brorl").info("config: %s", saved)
        return load_config(saved, args.overrides)
    return load_config(args.config, args.overrides)


def _train(args) -> int:
    from brorl.trainer.loop import check_inputs, train

    if args.launcher:
        args.overrides = [*args.overrides, f"launcher={args.launcher}"]
    cfg = _load_config(args, args.resume)
    check_inputs(cfg)
    if cfg.launcher == "ray":
        from brorl.trainer.launch_ray import train_ray as train
    run_dir = Path(args.resume or cfg.output_dir)
    try:
        result = train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        from brorl.trainer.checkpoint import checkpoint_dirs

        ckpts = checkpoint_dirs(run_dir)
        print("\nbrorl train: interrupted; " + (
            f"the newest checkpoint is {ckpts[-1]}: continue with brorl train --resume "
            f"{run_dir}" if ckpts else "no checkpoint was written yet (run again with "
            "overwrite=true to start over in the same output_dir)"), file=sys.stderr)
        return 130
    before, after = result["before"], result["after"]
    if before and after:
        k = cfg.eval.k
        print(f"\nheld-out accuracy (mean@{k}, temperature {cfg.eval.temperature}): "
              f"{before['eval/mean_at_k']:.3f} before -> {after['eval/mean_at_k']:.3f} after "
              f"({100 * (after['eval/mean_at_k'] - before['eval/mean_at_k']):+.1f} points); "
              f"pass@{k} {before['eval/pass_at_k']:.3f} -> {after['eval/pass_at_k']:.3f}; "
              + (f"greedy {before['eval/greedy']:.3f} -> {after['eval/greedy']:.3f}; "
                 if "eval/greedy" in before and "eval/greedy" in after else "")
              + f"run dir {args.resume or cfg.output_dir}")
    return 0


def _eval(args) -> int:
    from brorl.trainer.checkpoint import CHECKPOINTS, latest_checkpoint
    from brorl.trainer.data import load_problems
    from brorl.trainer.evaluate import evaluate
    from brorl.trainer.loop import local_engine
    from brorl.trainer.verifiers import VerifierPool

    path = Path(args.checkpoint)
    run_dir = (path if (path / CHECKPOINTS).is_dir() else
               path.parent.parent if path.parent.name == CHECKPOINTS else None)
    if run_dir == path:
        path = latest_checkpoint(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{args.checkpoint} is neither a checkpoint dir nor a run dir")
    cfg = _load_config(args, run_dir)  # its data, verifier and eval settings
    engine = local_engine(str(path), cfg)  # as the run's trainer built it
    _, held_out = load_problems(cfg.data)
    with VerifierPool(cfg.verifier.num_workers, cfg.verifier.timeout_s) as pool:
        result = evaluate(engine, held_out, cfg, pool)
    print(json.dumps({"checkpoint": str(path), **result}, indent=1))
    return 0


def _info_arguments(parser) -> None:
    from brorl.engine.info import add_arguments

    add_arguments(parser)


def _info(args) -> int:
    from brorl.engine.info import run

    return run(args)


def _plot(args) -> int:
    from brorl.trainer.plot import plot_run

    for out in plot_run(args.run_dir, args.out):
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
