"""brorl's rollout engine: `Engine(model=...).generate(prompts, SamplingParams(n=512))`."""

from brorl.engine.config import EngineConfig, ModelConfig
from brorl.engine.engine import Engine
from brorl.engine.outputs import CompletionOutput, RequestOutput
from brorl.engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "ModelConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput"]
