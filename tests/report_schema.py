"""docs/reports.md against written reports: the documented keys of each report file, the key
paths of a written document, and the check that the two agree (used by tests/test_reports_schema.py
and by the slow tests that write the reports only a training run or the GPU check produces).

docs/reports.md's layout: per report file a heading ``## `FILE` (COMMAND)`` and a table
``| key | meaning | unit |``; keys are dotted paths, ``key[]`` for the items of a list,
``<name>`` for a key that is a name (a mitigation, a package, a layer), a trailing ``<...>``
for any keys below (the fields of a settings object copied in); a meaning that starts with
``(optional`` marks a key that only some runs write; a meaning that names ``fragment `X` ``
expands to the rows of the section ``## fragment `X` `` under that key.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

DOC = Path(__file__).resolve().parents[1] / "docs" / "reports.md"
HEADING = re.compile(r"^## `([^`]+)` \((.+)\)\s*$")
FRAGMENT = re.compile(r"^## fragment `([^`]+)`\s*$")
USES = re.compile(r"fragment `([^`]+)`")
WILDCARD = re.compile(r"<[^<>]+>")


def _rows(lines: list[str]) -> list[tuple[str, str, str]]:
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        rows.append((cells[0].strip("`"), cells[1], cells[2]))
    return rows


@lru_cache(maxsize=1)
def sections() -> dict[str, list[tuple[str, str, str]]]:
    """{"FILE (COMMAND)" or "fragment X": [(key, meaning, unit)]} as docs/reports.md has them."""
    found: dict[str, list[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            m, f = HEADING.match(line), FRAGMENT.match(line)
            current = f"{m.group(1)} ({m.group(2)})" if m else f"fragment {f.group(1)}" if f else None
            if current is not None:
                found[current] = []
        elif line.startswith("# "):
            current = None
        elif current is not None:
            found[current].append(line)
    return {name: _rows(lines) for name, lines in found.items()}


def documented(section: str) -> dict[str, bool]:
    """{key path: optional} of one report file, fragments expanded."""
    table = sections()
    if section not in table:
        raise KeyError(f"docs/reports.md has no section '## `{section.split(' (')[0]}` ({section.split(' (', 1)[1]}'")
    return _expand(table[section], "", False, table)


def _expand(rows, prefix: str, optional: bool, table) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for key, meaning, _ in rows:
        path = f"{prefix}.{key}" if prefix and not key.startswith("[") else prefix + key
        opt = optional or meaning.startswith("(optional")
        out[path] = opt
        used = USES.search(meaning)
        if used:
            out.update(_expand(table[f"fragment {used.group(1)}"], path, False, table))
    return out


def key_paths(doc: Any, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every key path of a JSON document, the paths whose value is null or a not-computed record:
    nothing below them is expected)."""
    paths: set[str] = set()
    stops: set[str] = set()

    def walk(value: Any, path: str) -> None:
        if isinstance(value, Mapping):
            if value.get("status") == "not computed":
                stops.add(path)
                return
            for key, sub in value.items():
                child = f"{path}.{key}" if path else str(key)
                paths.add(child)
                walk(sub, child)
        elif isinstance(value, list):
            for item in value:  # a list of numbers (or of lists of numbers) is one value
                if isinstance(item, Mapping):
                    paths.add(path + "[]")
                if isinstance(item, (Mapping, list)):
                    walk(item, path + "[]")
        elif value is None:
            stops.add(path)

    walk(doc, prefix)
    return paths, stops


def _regex(pattern: str) -> re.Pattern:
    """`<name>`: one key (a name, dots allowed: layer names have them); a trailing `<...>`: any
    keys below (the fields of a settings object)."""
    rest = pattern.endswith(".<...>")
    parts = WILDCARD.split(pattern[:-6] if rest else pattern)
    body = r"[^\[\]]+?".join(re.escape(p) for p in parts)  # a name may hold dots (layer names)
    return re.compile(body + (r"(\.|\[\]).+" if rest else "") + r"\Z")


def _parent(pattern: str) -> str:
    if pattern.endswith("[]"):
        return pattern[:-2]
    cut = max(pattern.rfind("."), pattern.rfind("[]") + 1 if "[]" in pattern else -1)
    return pattern[:cut] if cut > 0 else ""


def _ancestors(pattern: str) -> Iterable[str]:
    while (pattern := _parent(pattern)):
        yield pattern


def compare(section: str, docs: Iterable[Mapping]) -> tuple[list[str], list[str]]:
    """(written key paths docs/reports.md does not list, listed non-optional keys no document
    wrote) for one or more written documents of one report file (their keys are pooled)."""
    keys = documented(section)
    compiled = {k: _regex(k) for k in keys}
    written: set[str] = set()
    stops: set[str] = set()
    for doc in docs:
        p, s = key_paths(doc)
        written |= p
        stops |= s
    undocumented = sorted(p for p in written if not any(r.match(p) for r in compiled.values()))

    def present(pattern: str, pool: set[str]) -> bool:
        r = compiled.get(pattern) or _regex(pattern)
        return any(r.match(p) for p in pool)

    missing = []
    for key, optional in keys.items():
        if optional or key.endswith("[]") or present(key, written):  # a list may be empty
            continue
        parents = list(_ancestors(key))
        if any(present(a, stops) for a in parents):  # under a null or not-computed value
            continue
        if parents and not present(parents[0], written):  # its container is absent or an empty list
            continue
        missing.append(key)
    return undocumented, missing


def assert_documented(section: str, *docs: Mapping, version: int = 1) -> None:
    """Every written key is in docs/reports.md's section, every documented non-optional key was
    written, and each document carries schema_version == `version` as its first key."""
    for doc in docs:
        assert next(iter(doc), None) == "schema_version" and doc["schema_version"] == version, (
            section, list(doc)[:3])
    undocumented, missing = compare(section, docs)
    assert not undocumented, f"{section}: written but not in docs/reports.md: {undocumented}"
    assert not missing, f"{section}: in docs/reports.md but not written: {missing}"
