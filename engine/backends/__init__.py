"""Optional generation backends behind the `Engine.generate` contract (prompts +
SamplingParams -> list[RequestOutput]) and the weight-sync protocol. Each module imports
its third-party package lazily, on first use, so importing `engine` never needs them."""
