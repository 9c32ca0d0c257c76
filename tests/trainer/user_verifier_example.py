"""User verifiers for tests/trainer/test_verifiers.py, named as "module:function" so that
spawned VerifierPool workers can import them."""

import os
import time

from brorl.trainer.verifiers import VerifyItem


def exact_match(item: VerifyItem) -> float:
    """1.0 when the stripped response equals the stripped gold answer."""
    return float(item.response.strip() == (item.answer or "").strip())


def slow(item: VerifyItem) -> float:
    """Sleeps metadata["sleep_s"] seconds (default 60), then scores 1."""
    time.sleep(float(item.metadata.get("sleep_s", 60.0)))
    return 1.0


def crash(item: VerifyItem) -> float:
    """Always raises."""
    raise RuntimeError(f"boom on {item.response!r}")


def die(item: VerifyItem) -> float:
    """Kills its own process, as a segfaulting native library would."""
    os._exit(3)


def out_of_range(item: VerifyItem) -> float:
    """Returns a reward outside [0, 1]."""
    return 2.0
