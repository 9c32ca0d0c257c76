"""Reward verifiers: a registry of `(VerifyItem) -> float in [0, 1]` functions ("math",
"reasoning_gym", "code", or a user's "module:function") and VerifierPool, which scores
batches in worker processes under per-item timeouts. Heavy dependencies (math-verify,
reasoning-gym) are imported on first use."""

from brorl.trainer.verifiers import code, gym, math_verifier  # noqa: F401  (register built-ins)
from brorl.trainer.verifiers.base import (
    VERIFIERS,
    VerifyItem,
    VerifyResult,
    extract_answer,
    get_verifier,
    load_user_verifier,
    register_verifier,
)
from brorl.trainer.verifiers.pool import VerifierPool, verify_one
from brorl.trainer.verifiers.sandbox import SandboxResult, run_sandboxed, sandbox_isolation

__all__ = [
    "VERIFIERS",
    "SandboxResult",
    "VerifierPool",
    "VerifyItem",
    "VerifyResult",
    "extract_answer",
    "get_verifier",
    "load_user_verifier",
    "register_verifier",
    "run_sandboxed",
    "sandbox_isolation",
    "verify_one",
]
