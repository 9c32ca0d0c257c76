import pytest


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A 2-layer demo policy (3 warm-start steps) saved as an HF checkpoint; its path."""
    from brorl.trainer.config import DemoConfig
    from brorl.trainer.demo import demo_policy

    cfg = DemoConfig(sft_steps=3, sft_examples=64, sft_batch_size=8, hidden_size=32,
                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     cache_dir=str(tmp_path_factory.mktemp("demo")))
    return demo_policy(cfg, progress=False)
