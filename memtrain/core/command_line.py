"""One command-line shape for every command: `memtrain CMD [RECIPE.yaml] [POSITIONALS] [key=value ...]
[--flag value ...]`.

A command's config is a dataclass; its flags are derived from the fields (`--name` for a field,
`--section.name` for a field of a nested settings group, `--no_name` for a boolean that is on),
every flag is also a recipe key, and `key=value` (or `--set key=value`, an alias) changes any
key, nested ones included. Values are applied in this order, later ones winning: the command's
per-model defaults, the recipe file, positionals, `key=value` overrides, flags. Nothing here
reads anything but the recipe file: the values are checked when the dataclass is built.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from memtrain.core.config import apply_overrides, build, parse_yaml, read_yaml
from memtrain.core.errors import MemtrainError

OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")
RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Positional:
    """A positional argument of a command, filling the config field `field`."""

    field: str
    metavar: str
    help: str
    many: bool = False  # takes every remaining positional
    required: bool = True


@dataclass
class CommandLine:
    """What the user typed, sorted: the recipe file, values by dotted key, key=value overrides."""

    recipe: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    def data(self, base: dict | None = None) -> dict:
        """The config mapping: `base` (per-model defaults), the recipe, overrides, then flags."""
        data = copy.deepcopy(base or {})
        if self.recipe is not None:
            merge(data, read_yaml(self.recipe))
        apply_overrides(data, list(self.overrides))
        for key, value in self.values.items():
            set_dotted(data, key, value)
        return data

    def config(self, cls: type, base: dict | None = None):
        """The checked `cls` these values describe (no file but the recipe is read)."""
        return build(cls, self.data(base))


def merge(into: dict, other: dict) -> dict:
    """Deep-merge `other` into `into` (mappings merge key by key, anything else replaces)."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def set_dotted(data: dict, key: str, value: Any) -> None:
    """data['a']['b'] = value for key 'a.b'."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _flag_type(tp) -> tuple[Any, dict]:
    """(argparse type, extra kwargs) for one annotation: Optional[X] -> X, Literal -> choices."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and args:
        if len(args) > 1:  # e.g. float | str: hand argparse the string, the dataclass checks it
            return str, {}
        tp = args[0]
    if typing.get_origin(tp) is Literal:
        return type(typing.get_args(tp)[0]), {"choices": list(typing.get_args(tp))}
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], {"nargs": "+"}
    return tp, {}


def _describe_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "default: none"
    if isinstance(value, bool):
        return f"default: {'on' if value else 'off'}"
    return f"default: {value}"


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """The comments written beside (or just above) each field of a dataclass: the help of a flag
    whose field has no `option(help=...)`, so the comment stays the one description."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments, above = {}, []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        match = re.match(r"^([A-Za-z_]\w*)\s*:", text)
        if match and "#" in text and not text.rstrip().endswith(("(", ",")):
            comments[match.group(1)] = text.split("#", 1)[1].strip()
        elif match and above:
            comments[match.group(1)] = " ".join(above)
        above = []
    return comments


def _declaring_class(cls: type, name: str) -> type:
    """The class in cls's MRO that declares field `name` (the option group it belongs to)."""
    for base in reversed(cls.__mro__):
        if name in getattr(base, "__annotations__", {}):
            return base
    return cls


def _group_title(group: type) -> str:
    """A help section's title: the group's name and its docstring's first sentence."""
    doc = " ".join((group.__doc__ or "").split("\n\n")[0].split()).split(". ")[0].rstrip(".:")
    return f"{group.__name__} ({doc})" if doc else group.__name__


def add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: Sequence[str] = (),
                     taken: set | None = None, flat: bool = False, target: Any = None) -> None:
    """One flag per field of `cls`: `--name` (or `--section.name` in a nested group), with the
    default in its help, shown under the option group that declares it; a mapping-valued field
    takes YAML."""
    taken = set() if taken is None else taken
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]
    if not prefix:  # the command's own fields first, then each option group's
        order = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]
        fields.sort(key=lambda f: order.index(_declaring_class(cls, f.name)))
    groups: dict[type, Any] = {}
    for f in fields:  # the command's own spellings first: a flat alias never shadows them
        taken.add(f"--{prefix}{f.name}")
    for f in fields:
        tp, key = hints[f.name], f"{prefix}{f.name}"
        owner = _declaring_class(cls, f.name)
        if target is None and owner not in groups:
            groups[owner] = parser.add_argument_group(_group_title(owner))
        where = target if target is not None else groups[owner]
        if dataclasses.is_dataclass(tp):
            add_config_flags(parser, tp, f"{key}.", (), taken, f.metadata.get("flat", False), where)
            continue
        aliases = [*f.metadata.get("flags", ()), f"--{f.name}"] if flat else []
        if not prefix:
            aliases = list(f.metadata.get("flags", ()))
        names = list(dict.fromkeys([f"--{key}", *(a for a in aliases if a not in taken)]))
        taken.update(names)
        described = f.metadata.get("help") or field_comments(_declaring_class(cls, f.name)).get(f.name, "")
        help_text = f"{described} ({_describe_default(f)})".strip()
        if tp is bool:
            negatives = [f"--no_{key}", f"--no-{key.replace('_', '-')}"]
            where.add_argument(*names, dest=key, action="store_const", const=True,
                                help=f"{help_text}; {negatives[0]} turns it off")
            where.add_argument(*dict.fromkeys(negatives), dest=key, action="store_const", const=False,
                                help=argparse.SUPPRESS)
            continue
        if tp is dict or typing.get_origin(tp) is dict or dict in typing.get_args(tp):
            where.add_argument(*names, dest=key, type=_mapping, help=help_text, metavar="YAML")
            continue
        if tp is list:  # an untyped list: each item read as YAML (numbers stay numbers)
            where.add_argument(*names, dest=key, type=_yaml_value, nargs="*", help=help_text, metavar="VALUE")
            continue
        arg_type, extra = _flag_type(tp)
        metavar = {} if "choices" in extra else {"metavar": f.name.upper()}
        where.add_argument(*names, dest=key, type=arg_type, help=help_text, **metavar, **extra)


def _yaml_value(text: str) -> Any:
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def _mapping(text: str) -> dict:
    """A flag's YAML (or JSON) mapping, e.g. --duplicate_spec '{"3": 40}'."""
    try:
        value = parse_yaml(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a YAML/JSON mapping (e.g. '{{key: value}}')")
    return value


def command_parser(prog: str, description: str, cls: type, positionals: Sequence[Positional] = (),
                   recipe: str = "optional", skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argparse parser of a command whose flags mirror `cls` (see the module docstring)."""
    words = [p.metavar + ("..." if p.many else "") if p.required else f"[{p.metavar}]" for p in positionals]
    if recipe != "none":
        words.insert(0, "RECIPE.yaml" if recipe == "required" else "[RECIPE.yaml]")
    shape = " ".join([*words, "[key=value ...]"])
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage=f"{prog} {shape} [--flags]")
    lines = [f"{p.metavar}: {p.help}" for p in positionals]
    if recipe != "none":
        lines.insert(0, "RECIPE.yaml: settings as YAML; its keys are the flags' names (nested: section: {key: ...})")
    lines.append("key=value: set any recipe key, nested ones with dots (e.g. attack.steps=10); "
                 "--set key=value ... is the same")
    parser.add_argument("items", nargs="*", metavar="ARGS", help="; ".join(lines))
    parser.add_argument("--set", dest="__set", nargs="+", action="extend", metavar="KEY=VALUE",
                        help="recipe keys to change (alias of bare key=value)")
    if recipe != "none":
        parser.add_argument("--recipe", dest="__recipe", metavar="RECIPE.yaml", help="the recipe file "
                            "(alias of the positional RECIPE.yaml)")
    add_config_flags(parser, cls, skip=skip)
    return parser


def _peel(values: list, overrides: list[str], spare: list[str]) -> list:
    """A list flag's values without the key=value and recipe tokens it swallowed."""
    kept = []
    for value in values:
        if isinstance(value, str) and OVERRIDE.match(value):
            overrides.append(value)
        elif isinstance(value, str) and value.endswith(RECIPE_SUFFIXES):
            spare.append(value)
        else:
            kept.append(value)
    return kept


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                       positionals: Sequence[Positional] = (), recipe: str = "optional") -> CommandLine:
    """Sort argv into a CommandLine; a positional too many or a recipe missing is an error."""
    namespace = vars(parser.parse_intermixed_args(argv))
    items, line = list(namespace.pop("items", [])), CommandLine()
    line.overrides = [str(s) for s in namespace.pop("__set", [])]
    line.recipe = namespace.pop("__recipe", None)
    spare: list[str] = []
    for key, value in namespace.items():
        line.values[key] = _peel(value, line.overrides, spare) if isinstance(value, list) else value
    words = []
    for item in items + spare:
        (line.overrides if OVERRIDE.match(item) else words).append(item)
    if recipe != "none" and line.recipe is None and words and (recipe == "required" or words[0].endswith(RECIPE_SUFFIXES)):
        line.recipe = words.pop(0)
    if recipe == "required" and line.recipe is None:
        parser.error("the recipe (a YAML file) is required")
    for p in positionals:
        if not words:
            if p.required:
                parser.error(f"{p.metavar} is required")
            break
        line.values[p.field] = list(words) if p.many else words[0]
        words = [] if p.many else words[1:]
    if words:
        parser.error(f"unexpected argument {words[0]!r} (options are --flags; settings key=value)")
    if line.recipe is not None and not Path(line.recipe).expanduser().is_file():
        raise MemtrainError(f"recipe file '{line.recipe}' does not exist")
    return line
