"""Loading the trainer's configuration (trainer/config.py): a YAML file plus
`section.key=value` overrides into the frozen TrainConfig tree. An unknown or mistyped key
is an error that names it and the closest valid key; `brorl train --help` prints
`describe()`."""

from __future__ import annotations

import difflib
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import yaml

from brorl.trainer.config import (
    AlgorithmConfig,
    DataConfig,
    DemoConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    RolloutConfig,
    TrainConfig,
    VerifierConfig,
)

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def all_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the tree, e.g. "rollout.n"."""
    out = []
    for f in fields(cls):
        sub = _section_type(cls, f)
        out += all_keys(sub, f"{prefix}{f.name}.") if sub else [prefix + f.name]
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (None: the shipped demo config) plus `a.b=value`
    overrides (values parsed as YAML: 3, 1e-4, true, null, [1, 2])."""
    path = DEMO_CONFIG if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key = key.strip()
        if not _dict_entry(key):  # data.gym_kwargs.max_terms=3: one entry of a dict key
            _check_key(key)
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):  # absent, or null in the file
                node[p] = {}
            node = node[p]
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    return build(TrainConfig, tree, "")


def build(cls, tree: dict, prefix: str):
    """Instantiates dataclass `cls` from a nested dict, checking every key."""
    if not isinstance(tree, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in tree.items():
        if key not in known:
            _check_key(prefix + str(key))
        f = known[key]
        sub = _section_type(cls, f)
        kwargs[key] = build(sub, value or {}, f"{prefix}{key}.") if sub else \
            _coerce(value, f, prefix + key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if is_dataclass(v) else v
    return out


def describe() -> str:
    """Every key with its default and help, for `brorl train --help`; where the shipped
    demo config (what a run without --config starts from) sets another value, that too."""
    demo = yaml.safe_load(DEMO_CONFIG.read_text()) or {}
    lines = ["  (the default is for keys a --config file omits; [demo: X] is what a run "
             "without --config uses, from trainer/configs/demo.yaml)"]
    for key in all_keys():
        f, default = _field_of(key)
        node = demo
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        shown = "" if node is _ABSENT or node == default else f" [demo: {node!r}]"
        lines.append(f"  {key:36s} {default!r:>24s}  {f.metadata.get('help', '')}{shown}")
    return "\n".join(lines)


_ABSENT = object()


def _dict_entry(key: str) -> bool:
    """Whether `key` names an entry of a dict-valued key (e.g. data.gym_kwargs.max_terms):
    set alone, it keeps the dict's other entries."""
    parts = key.split(".")
    if len(parts) < 3:
        return False
    head = ".".join(parts[:2])
    if head not in all_keys():
        return False
    f, default = _field_of(head)
    return isinstance(default, dict)


def _check_key(key: str) -> None:
    keys = all_keys()
    sections = {k.split(".")[0] for k in keys if "." in k}
    if key in keys:
        return
    if key in sections:
        raise ValueError(f"{key} is a section: set {key}.<key>=value (`brorl train --help` "
                         "lists them)")
    close = difflib.get_close_matches(key, keys + sorted(sections), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown config key {key!r}{hint} (`brorl train --help` lists them)")


def _field_of(key: str):
    cls, parts = TrainConfig, key.split(".")
    for p in parts[:-1]:
        cls = _SECTIONS[p]
    f = {f.name: f for f in fields(cls)}[parts[-1]]
    default = f.default if f.default is not MISSING else f.default_factory()
    return f, default


def _section_type(cls, f):
    """The dataclass of a section field of TrainConfig, else None (a leaf)."""
    return _SECTIONS.get(f.name) if cls is TrainConfig else None


_SECTIONS = {"model": ModelConfig, "demo": DemoConfig, "data": DataConfig,
             "rollout": RolloutConfig, "algorithm": AlgorithmConfig, "optim": OptimConfig,
             "eval": EvalConfig, "verifier": VerifierConfig, "ray": RayConfig}


def _coerce(value, f, key: str):
    """Light type checking of a leaf value against the field's annotation."""
    ann = str(f.type)
    if value is None:
        if "None" in ann:
            return None
        raise ValueError(f"{key} cannot be null")
    if ann.startswith("int") and isinstance(value, int) and not isinstance(value, bool):
        return value
    if ann.startswith("float") and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            raise ValueError(f"{key} must be float, got {value!r}") from None
    if ann.startswith("float") and isinstance(value, (int, float)) and \
            not isinstance(value, bool):
        return float(value)
    checks = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict,
              "list": list}
    alts = [a.strip() for a in ann.split("|") if a.strip() != "None"]  # "list | str"
    if any(a not in checks for a in alts):
        return value
    if any(isinstance(value, checks[a]) and not (a in ("int", "float")
                                                 and isinstance(value, bool)) for a in alts):
        return value
    raise ValueError(f"{key} must be {' or '.join(alts)}, got {value!r}")
