"""One registry style for everything looked up by name (mitigations, detectors, copy descriptors,
autoencoder codecs).

Entries are registered by decorator (`@REG.register`, the key read off the object, or
`@REG.register("name")`), by name (`REG.add(name, obj)`), or lazily (`REG.lazy(name,
"module:attribute")`): a lazy entry is a string until its first lookup, which imports the module
with importlib. That is how a lower layer names a class that lives above it (the testbed's codec)
without importing it. Names are canonical (case, surrounding blanks and '-' vs '_' ignored) unless
the registry says otherwise; an unknown name is a one-line MemtrainError listing the known names,
with the closest one suggested.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterator

from memtrain.core.errors import MemtrainError


def canonical_name(name: str) -> str:
    """The default key: lower case, no surrounding blanks, '-' read as '_'."""
    return str(name).strip().lower().replace("-", "_")


class _Lazy(str):
    """A "module:attribute" entry not imported yet."""


class Registry:
    """Named entries of one kind ("mitigation", "detector", ...), in registration order."""

    def __init__(self, kind: str, key: Callable[[Any], str] | None = None,
                 canonical: Callable[[str], str] = canonical_name, hint: str = "", sort_names: bool = False,
                 error: type[MemtrainError] = MemtrainError):
        self.kind = kind
        self._error = error  # the unknown-name error's class (a MemtrainError)
        self._sort = sort_names  # list the names sorted (else in registration order)
        self._key = key  # the name of an object registered without one (a class's `name`, ...)
        self._canonical = canonical
        self._hint = hint  # appended to the unknown-name message
        self._entries: dict[str, Any] = {}

    # registering -------------------------------------------------------------------------------
    def register(self, target: Any = None, *, name: str | None = None):
        """Decorator: `@reg.register` (name from the registry's key function), or
        `@reg.register("name")` / `@reg.register(name="name")`. Returns the object unchanged."""
        if isinstance(target, str):
            name, target = target, None
        if target is None:
            return lambda obj: self.add(name if name is not None else self._key_of(obj), obj)
        return self.add(name if name is not None else self._key_of(target), target)

    def add(self, name: str, obj: Any) -> Any:
        """Register `obj` under `name`. A lazy entry of that name is replaced (the import it
        named registering itself); another object already under it is an error."""
        key = self._canonical(name)
        if not key:
            raise ValueError(f"{self.kind}: {obj!r} has no name")
        held = self._entries.get(key)
        if held is not None and not isinstance(held, _Lazy) and held is not obj:
            raise ValueError(f"{self.kind} name '{key}' is already registered by {held}")
        self._entries[key] = obj
        return obj

    def lazy(self, name: str, target: str) -> None:
        """Register "module:attribute", imported on the first lookup of `name`. An entry already
        there (registered for real) is kept."""
        module, _, attribute = target.partition(":")
        if not module or not attribute:
            raise ValueError(f"{self.kind} '{name}': a lazy entry is 'module:attribute', got '{target}'")
        self._entries.setdefault(self._canonical(name), _Lazy(target))

    def pop(self, name: str, default: Any = None) -> Any:
        """Remove an entry (tests register throw-away ones)."""
        return self._entries.pop(self._canonical(name), default)

    # looking up --------------------------------------------------------------------------------
    def get(self, name: str | None, default: Any = None) -> Any:
        """The entry of `name` (imported if lazy), or `default` when unknown."""
        key = self._canonical(name) if name is not None else None
        if key not in self._entries:
            return default
        held = self._entries[key]
        if isinstance(held, _Lazy):
            module, _, attribute = held.partition(":")
            try:
                held = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError) as err:
                raise self._error(f"{self.kind} '{key}' names '{held}', which does not import: {err}") from err
            self._entries[key] = held
        return held

    def __getitem__(self, name: str) -> Any:
        missing = object()
        found = self.get(name, missing)
        if found is missing:
            raise self.unknown(name)
        return found

    def unknown(self, name: str | None):
        """The one-line error for a name this registry does not hold."""
        known = self.names()
        close = difflib.get_close_matches(self._canonical(str(name)), known, n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        return self._error(f"unknown {self.kind} '{name}': choose one of {', '.join(known)}{guess}{self._hint}")

    def is_loaded(self, name: str) -> bool:
        """False while `name` is a lazy entry not looked up yet."""
        return not isinstance(self._entries.get(self._canonical(name)), _Lazy)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._canonical(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """The registered names, in registration order (sorted if the registry sorts them)."""
        return sorted(self._entries) if self._sort else list(self._entries)

    def _key_of(self, obj: Any) -> str:
        if self._key is None:
            raise ValueError(f"{self.kind} registry: register {obj!r} with a name")
        return self._key(obj)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
