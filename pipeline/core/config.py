"""Strict dataclass configs loaded from YAML.

Unknown keys are rejected, values are type-checked (with the int -> float widening YAML needs), nested
dataclasses are built recursively, and ``--set section.key=value`` overrides are parsed with YAML's scalar rules.
Cross-field rules live in each dataclass's ``__post_init__`` and raise :class:`UserError`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from winnow.pipeline.core.errors import UserError, did_you_mean

T = TypeVar("T")


def _check_value(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, tp, where)
    if origin in (list, tuple, dict):
        return _check_container(value, tp, origin, where)
    return _check_scalar(value, tp, where)


def _check_union(value: Any, tp: Any, where: str) -> Any:
    errors = []
    for arg in get_args(tp):
        if arg is type(None):
            if value is None:
                return None
            continue
        try:
            return _check_value(value, arg, where)
        except UserError as exc:
            errors.append(str(exc))
    raise UserError(errors[0] if errors else f"{where}: unexpected value {value!r}")


def _check_container(value: Any, tp: Any, origin: type, where: str) -> Any:
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_check_value(k, key_tp, where): _check_value(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: expected a list, got {value!r}")
    (item_tp, *_) = get_args(tp) or (Any,)
    items = [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _check_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and value.lower() in ("inf", ".inf", "infinity"):
        return float("inf")
    if isinstance(tp, type):
        if tp is int and isinstance(value, bool):
            raise UserError(f"{where}: expected int, got {value!r}")
        if not isinstance(value, tp):
            raise UserError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict | None, where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    where = where or cls.__name__
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; {did_you_mean(unknown[0], fields)}allowed keys: "
                        f"{', '.join(sorted(fields))}")
    for name, value in data.items():  # a nested section given in part keeps its own defaults for the rest
        default = _default(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            data[name] = deep_merge(dataclasses.asdict(default), value)
    kwargs = {name: _check_value(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise UserError(f"{where}: {exc}") from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def default_of(cls: type, key: str) -> Any:
    """The default of a dotted key (``"demo.dist.steps"``) of dataclass ``cls``, nested defaults included."""
    obj: Any = cls()
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(obj: Any) -> dict:
    """Plain-data view of a config, suitable for YAML/JSON and for manifests."""
    return dataclasses.asdict(obj)


def parse_overrides(pairs: list[str] | None) -> dict:
    """Turn ``["ingest.timeout=3", "synth.seed=7"]`` into a nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set ingest.timeout=5")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` of ``text``; any YAML problem (including tags such as ``!!python/object``, which safe
    loading never constructs) becomes one UserError line naming ``where``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())[:200]
        raise UserError(f"{where} is not valid YAML{at}: {problem} (only plain YAML is read; tags such as "
                        "!!python are refused)") from None


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def substitute(text: str, variables: dict[str, str], where: str, used: set | None = None) -> str:
    """Fill ``${name}`` (required) and ``${name:-default}`` placeholders of a recipe or task list (the names met
    are added to ``used``)."""
    def fill(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if used is not None:
            used.add(name)
        if name in variables:
            return str(variables[name])
        if default is not None:
            return default
        raise UserError(f"recipe {where} uses ${{{name}}}; pass --var {name}=VALUE")

    return _VAR.sub(fill, text)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (pass an existing YAML file)")
    data = parse_yaml(path.read_text(), f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         extra: dict | None = None) -> T:
    """Load ``cls`` from an optional YAML file, then ``--set`` overrides, then ``extra`` (a nested dict)."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, deep_merge(deep_merge(data, parse_overrides(overrides)), extra or {}))


def path(default: str | list = "", always: bool = False):
    """A config field that may hold local paths: made absolute before any task is built, so workers started in
    another folder see the same files. A value that may also be a name (a pretrained tag) is changed only when it
    exists here as a path; ``always``: changed even when it does not exist yet (an output folder)."""

    meta = {"path": "always" if always else "existing"}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
