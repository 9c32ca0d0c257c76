"""Config: YAML + key=value overrides, typed leaves, and errors that name the bad key."""

import pytest
import torch

from brorl.trainer.config import TrainConfig
from brorl.trainer.config_load import DEMO_CONFIG, all_keys, describe, load_config


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(None, ["rollout.n=16", "optim.lr=5e-4", "steps=3", "output_dir=/tmp/x",
                             "algorithm.dual_clip=3", "rollout.max_kv_tokens=null"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.rollout.n, cfg.steps, cfg.output_dir) == (16, 3, "/tmp/x")
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.algorithm.dual_clip == 3.0 and cfg.rollout.max_kv_tokens is None
    assert load_config(None).rollout.n == 512  # the shipped demo is BroRL's N


@pytest.mark.parametrize("override,hint", [
    ("rollout.nn=3", "'rollout.n'"), ("rollut.n=3", "'rollout.n'"), ("stepz=2", "'steps'"),
    ("algorithm.eps_hihg=0.3", "'algorithm.eps_high'"),
])
def test_unknown_key_names_it_and_the_closest_valid_key(override, hint):
    with pytest.raises(ValueError, match="unknown config key") as e:
        load_config(None, [override])
    assert override.split("=")[0] in str(e.value) and hint in str(e.value)


def test_unknown_key_in_yaml_file_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  n: 8\n  temprature: 0.7\n")
    with pytest.raises(ValueError, match="rollout.temprature.*rollout.temperature"):
        load_config(f)


@pytest.mark.parametrize("override,match", [
    ("rollout.n=abc", "rollout.n must be int"), ("rollout.n=0", "rollout.n must be >= 2, got 0"),
    ("rollout.max_tokens=0", "rollout: max_tokens must be an integer >= 1, got 0"),
    ("eval.max_tokens=-1", "eval: max_tokens must be an integer >= 1, got -1"),
    ("eval.k=0", "eval.k must be > 0"),
    ("rollout.n=1", "rollout.n must be >= 2, got 1: .*a group of one has advantage 0"),
    ("algorithm.advantage", "not of the form key=value"), ("steps=1.5", "steps must be int"),
    ("algorithm.tis=clip", "tis must be one of"), ("optim.lr=fast", "optim.lr must be float"),
    ("ray.num_trainers=2", "num_trainers=2 needs launcher=ray"),
    ("ray.trainer_gpus=2", "trainer_gpus=2.*set ray.num_trainers"),
    ("ray.num_trainers=0", "num_trainers must be > 0"),
    # sampling options fail at load, not at the first generate call after the warm start
    ("rollout.top_p=0", r"rollout: top_p must be in \(0, 1\]"),
    ("rollout.top_k=0", "rollout: top_k must be -1"), ("eval.top_p=1.5", "eval: top_p"),
    ("eval.temperature=-1", "eval: temperature must be >= 0"),
    ("rollout.attention_backend=fast", "attention_backend must be one of auto, torch"),
    # the loss's own checks, at load rather than after the first rollout
    ("algorithm.advantage=ppo", "advantage must be one of dr_grpo, grpo, "),
    ("algorithm.eps_low=1.5", r"eps_low must be in \[0, 1\), got 1.5"),
    ("algorithm.eps_high=-0.1", "eps_high must be >= 0"),
    ("algorithm.dual_clip=0.5", "dual_clip must be > 1"),
    ("algorithm.kl_clamp=-1", "kl_clamp must be > 0"), ("algorithm.kl_coef=-0.1", "kl_coef"),
    # else each engine (a Ray worker's too) fails when it is built
    ("rollout.max_kv_tokens=8", "max_kv_tokens=8 must hold at least one page of "),
    # at load, not after the demo's warm start; by the key the user typed
    ("model.device=gpu", 'model.device must be "auto", "cpu", "cuda" or "cuda:N"'),
    ("model.dtype=fp16", "model.dtype must be one of float32, float16, bfloat16"),
    ("output_dir=", "output_dir is empty"), ("rollout.stop=3", "must be list or str"),
    ("rollout=3", "rollout is a section: set rollout.<key>=value"),
    # before, accepted at load: failing after the warm start, or running with odd meanings
    ("verifier.timeout_s=0", "verifier.timeout_s must be > 0"),
    ("verifier.num_workers=-1", "verifier.num_workers must be >= 0"),
    ("optim.betas=[2,3]", r"optim.betas must be two numbers in \[0, 1\)"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0"),
    ("eval.every=-1", "eval.every must be >= 0"),  # step % -1 == 0: every step
    ("algorithm.ref_reset_every=-2", "algorithm.ref_reset_every must be >= 0"),
])
def test_bad_values_raise_naming_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_importance_bounds_are_checked_at_load_with_their_default():
    with pytest.raises(ValueError, match=r"low=0.5, high=0.3 \(tis_low None: 0.5 for mask"):
        load_config(None, ["algorithm.old_logprobs=recompute", "algorithm.tis=mask",
                           "algorithm.tis_high=0.3"])
    # without an importance correction the bounds are not used
    assert load_config(None, ["algorithm.tis_high=0.3"]).algorithm.tis_high == 0.3


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_help_lists_every_key_and_scaled_lr_follows_brorl():
    text = describe()
    for key in all_keys():
        assert key in text
    base = load_config(None, ["rollout.n=16", "rollout.prompts_per_step=16"])
    big = load_config(None, ["optim.scale_lr=true", "optim.lr_reference_samples=8192",
                             "rollout.n=512", "rollout.prompts_per_step=128",
                             "rollout.max_prompts_per_step=256"])
    assert base.lr == base.optim.lr
    assert big.lr == pytest.approx(big.optim.lr * (512 * 128 / 8192) ** 0.5)


def test_shipped_demo_yaml_is_valid_and_complete():
    assert DEMO_CONFIG.is_file()
    cfg = load_config(DEMO_CONFIG)
    assert cfg.model.path == "demo" and cfg.rollout.dynamic_sampling


def test_shipped_gpu_template_parses_with_the_papers_settings():
    cfg = load_config(DEMO_CONFIG.parent / "brorl-gpu.yaml")
    assert (cfg.rollout.n, cfg.rollout.prompts_per_step) == (512, 128)
    assert cfg.model.device == "cuda" and cfg.launcher == "ray"
    assert cfg.lr == pytest.approx(2e-6 * (512 * 128 / 8192) ** 0.5)
    assert cfg.algorithm.old_logprobs == "recompute" and cfg.algorithm.tis == "mask"
    assert cfg.rollout.oversample and cfg.algorithm.tis_bounds == (0.5, 5.0)
    assert (cfg.rollout.kv_memory_fraction, cfg.rollout.reserve_ratio) == (0.85, 0.25)
    assert cfg.optim.gradient_checkpointing


def test_the_engines_memory_options_reach_the_engine(qwen2):
    from brorl.trainer.loop import local_engine

    cfg = load_config(None, ["rollout.kv_memory_fraction=0.5", "rollout.reserve_ratio=0.4",
                             "model.device=cpu", "rollout.max_kv_tokens=1024"])
    config = local_engine(qwen2[0], cfg).config
    assert (config.kv_memory_fraction, config.reserve_ratio) == (0.5, 0.4)
    for bad in ("rollout.kv_memory_fraction=1", "rollout.reserve_ratio=1.5"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            load_config(None, [bad])


@pytest.mark.parametrize("overrides,match", [
    (["model.path=/nonexistent/ckpt"], "model.path '/nonexistent/ckpt' is not a checkpoint"),
    (["data.train=/nonexistent/train.jsonl"], "data.train '/nonexistent/train.jsonl': no such"),
    (["data.eval=/nonexistent/eval.jsonl"], "data.eval '/nonexistent/eval.jsonl': no such"),
])
def test_train_fails_fast_on_missing_inputs_before_starting_anything(
        tmp_path, capsys, overrides, match):
    from brorl.trainer.cli import main

    out = tmp_path / "run"
    code = main(["train", "--launcher", "ray", f"output_dir={out}", *overrides])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()  # no run directory, no Ray cluster: it failed before them


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: cuda is valid")
def test_train_on_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    from brorl.trainer.cli import main

    assert main(["train", "model.device=cuda", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "model.device is cuda but torch sees no CUDA device" in capsys.readouterr().err
    assert main(["train", "model.device=cuda:1", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "model.device is cuda:1 but torch sees no CUDA" in capsys.readouterr().err


def test_a_cuda_index_is_checked_against_the_visible_devices(monkeypatch):
    from brorl.trainer.loop import check_inputs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_inputs(load_config(None, ["model.device=cuda:1"]))
    with pytest.raises(ValueError, match="model.device=cuda:2: torch sees 2 CUDA device"):
        check_inputs(load_config(None, ["model.device=cuda:2"]))
    with pytest.raises(ValueError, match="with launcher=ray: Ray gives each actor its GPUs"):
        load_config(None, ["model.device=cuda:0", "launcher=ray"])


def test_input_checks_leave_a_remote_ray_cluster_its_own_paths_and_gpus():
    from brorl.trainer.loop import check_inputs

    remote = load_config(None, ["launcher=ray", "ray.address=ray://head:10001",
                                "model.path=/on/the/cluster", "model.device=cuda"])
    check_inputs(remote)  # nothing here to check against
    with pytest.raises(FileNotFoundError, match="model.path"):
        check_inputs(load_config(None, ["launcher=ray", "model.path=/on/the/cluster"]))


def test_a_stop_string_may_be_given_alone():
    cfg = load_config(None, ["rollout.stop=</answer>", "eval.stop=[a, b]"])
    assert cfg.rollout.sampling["stop"] == "</answer>" and cfg.eval.stop == ["a", "b"]
    assert load_config(None, ["model.device=cuda:1"]).model.device == "cuda:1"


def test_help_shows_the_demo_values_a_run_without_config_uses():
    from brorl.trainer.config_load import describe

    lines = {line.split()[0]: line for line in describe().splitlines()[1:]}
    assert lines["rollout.prompts_per_step"].endswith("[demo: 16]")  # default 4
    assert "[demo:" not in lines["rollout.n"]  # the demo sets 512, the default


def test_one_entry_of_a_dict_key_can_be_set_alone():
    cfg = load_config(None, ["data.gym_kwargs.max_terms=2"])
    assert cfg.data.gym_kwargs == {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                   "max_digits": 1}  # demo.yaml's others kept
    assert load_config(None, ["data.gym_kwargs={max_terms: 2}"]).data.gym_kwargs == {
        "max_terms": 2}  # a whole dict replaces it
    with pytest.raises(ValueError, match="unknown config key 'data.size.x'"):
        load_config(None, ["data.size.x=2"])
