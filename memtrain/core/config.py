"""One config system: YAML onto typed dataclasses, with dotted `key=value` overrides.

Every key is checked against the dataclass fields before anything runs: an unknown or
misspelled key, or a value of the wrong type, is a one-line MemtrainError naming the dotted key
(with the closest valid name). YAML is read with YAML 1.2's booleans (only true/false), so
`mixed_precision: no` or `init: off` stay strings; YAML 1.1 reads `1e-3` as a string, which a
float field accepts. A dataclass's own __post_init__ checks (ranges, choices) run on build.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from memtrain.core.errors import MemtrainError

T = TypeVar("T")


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose booleans are YAML 1.2's: `no`, `off`, `yes`, `on` remain strings."""


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values (safe loader, YAML 1.2 booleans); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Yaml12Loader)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str) -> Any:
    """Check (and lightly coerce: int -> float, list -> tuple) one value against its annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except MemtrainError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise MemtrainError(f"recipe key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        item_types = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise MemtrainError(f"recipe key '{key}' must be a list, got {type(value).__name__}")
        if origin is tuple and len(item_types) != len(value) and Ellipsis not in item_types:
            raise MemtrainError(f"recipe key '{key}' must have {len(item_types)} entries, got {len(value)}")
        items = [_convert(v, item_types[0] if origin is list or Ellipsis in item_types else item_types[i],
                          f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise MemtrainError(f"recipe key '{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise MemtrainError(f"recipe key '{key}' must be {_type_name(tp)}, got {type(value).__name__} ({value!r})")
    return value


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """A `cls` instance from a (nested) mapping; unknown keys and wrong types are errors."""
    where = prefix or "recipe"
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise MemtrainError(f"recipe key '{where}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise MemtrainError(f"unknown recipe key '{dotted}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MemtrainError(f"recipe is missing the required key '{dotted}'")
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` pairs (value parsed as YAML 1.2) set into a nested dict; bad syntax -> error."""
    for item in overrides:
        if "=" not in item:
            raise MemtrainError(f"override '{item}' must look like key=value (e.g. train.epochs=1)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise MemtrainError(f"override '{item}': empty key part in '{key}'")
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MemtrainError(f"override '{item}': '{'.'.join(parts[: depth + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping; a missing file or bad YAML is a one-line error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MemtrainError(f"recipe file '{path}' does not exist")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise MemtrainError(f"recipe '{path}' is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise MemtrainError(f"recipe '{path}' must be a YAML mapping at the top level")
    return data


def packaged_recipe(name: str) -> Path:
    """A recipe shipped inside the package (memtrain/recipes/), found with importlib.resources so
    an installed wheel finds it from any directory."""
    resource = importlib.resources.files("memtrain.recipes") / name
    if not resource.is_file():
        raise MemtrainError(f"no packaged recipe '{name}'")
    return Path(str(resource))


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> T:
    """`cls` from a YAML file (or a dict) with dotted overrides applied before validation."""
    base = read_yaml(path) if path is not None else dict(data or {})
    return build(cls, apply_overrides(base, list(overrides or [])))


def flat_items(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flat_items(value, dotted))
        else:
            out[dotted] = value
    return out


def first_difference(saved: dict, current: dict, ignore: tuple[str, ...] = (),
                     labels: tuple[str, str] = ("checkpoint", "now")) -> str | None:
    """The first dotted key (outside `ignore`; a trailing dot ignores a section) whose value
    differs between two configs, described for a one-line error; None if none does."""
    a, b = flat_items(saved), flat_items(current)
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in ignore):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return f"{key} ({labels[0]}: {a.get(key, '<absent>')!r}, {labels[1]}: {b.get(key, '<absent>')!r})"
    return None
