"""brorl's rollout engine: `Engine(model=...).generate(prompts, SamplingParams(n=512))`."""

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "ModelConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput"]
