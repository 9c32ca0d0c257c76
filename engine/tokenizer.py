"""Loading a checkpoint's tokenizer. transformers 5's AutoTokenizer lets config.json's
model_type override a generic `tokenizer_class` (TokenizersBackend /
PreTrainedTokenizerFast) and then builds a tokenizer that silently encodes nothing; such
checkpoints are loaded as the generic fast tokenizer they declare."""

from __future__ import annotations

import json
import os

_GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast")


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None when it has none."""
    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cls = None
    cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            cls = json.load(f).get("tokenizer_class")
    if cls in _GENERIC and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
