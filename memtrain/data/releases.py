"""Converters from public memorized-prompt releases into ManifestItems.

Formats (field names as published; see docs in each loader):
- ``webster``: Webster's ground-truth parquets (``caption``, ``url``, ``overfit_type`` in
  MV/TV/RV/N, ``retrieved_urls``, ...) and Wen et al.'s ``sdv1_500_memorized.jsonl``
  (``caption``, ``index``, ``url``; no label).
- ``nemo``: NeMo's ``prompts/*.csv``: ``;``-separated, an unnamed row-number column, then
  ``Caption``, ``URL``, optional ``type`` (VM/TM), ``mean_sscd``, ``max_sscd``, ``Index``.
- ``membench``: MemBench's ``SD1_final.csv``: unnamed row number, ``prompt``, ``urls`` (a
  Python list literal of one or more image URLs).
- ``prompts``: plain text, one prompt per line.
- ``manifest``: memtrain's own JSONL manifest.

Ids are stable across runs: the release's LAION index where it has one, else a hash of the
prompt. Labels are normalized to VM / TM / RV / N (Webster's MV -> VM, TV -> TM); the
release's own spelling is kept in ``extra["release_label"]`` when it differs.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from memtrain.core.manifest import ManifestError, ManifestItem, read_manifest

log = logging.getLogger(__name__)

FORMATS = ("webster", "nemo", "membench", "prompts", "manifest")

# Webster et al. write MV (matching verbatim) and TV (template verbatim); the papers and
# NeMo write VM and TM for the same classes.
_LABELS = {"MV": "VM", "VM": "VM", "TV": "TM", "TM": "TM", "RV": "RV", "N": "N", "NONE": "N"}


def normalize_label(raw: Any) -> str | None:
    """Map a release's label spelling to VM / TM / RV / N; other labels pass through."""
    if raw is None:
        return None
    text = str(raw).strip()
    if not text:
        return None
    return _LABELS.get(text.upper(), text)


def prompt_id(prompt: str) -> str:
    """A stable id for releases without an index: a short hash of the prompt text."""
    return "p" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:15]


def _fail(path: Path, what: str, fix: str) -> ManifestError:
    return ManifestError(f"{path}: {what}; {fix}")


def _get(row: dict[str, Any], *names: str) -> tuple[str | None, Any]:
    """Find the first of ``names`` among the row's keys, case-insensitively."""
    lowered = {str(k).strip().lower(): k for k in row}
    for name in names:
        key = lowered.get(name)
        if key is not None:
            return key, row[key]
    return None, None


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return None
    text = str(value).strip()
    return text or None


def _index_to_id(value: Any) -> str | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1030727993.0 from a float column is the same LAION index
    return _clean(value)


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if hasattr(value, "tolist"):
            return _json_safe(value.tolist())
        return str(value)


# ---------------------------------------------------------------- reading raw rows


def _check_file(path: Path) -> None:
    if not path.exists():
        raise _fail(path, "file not found", "check the path")
    if path.is_dir():
        raise _fail(path, "is a folder", "pass the release file itself")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports add a BOM
    except UnicodeDecodeError:
        raise _fail(path, "is not UTF-8 text", "re-save it as UTF-8") from None


def _read_json_rows(path: Path) -> list[tuple[int, dict]]:
    text = _read_text(path)
    if text.lstrip().startswith("["):  # a JSON array rather than JSONL
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise _fail(path, f"is not valid JSON ({e.msg} at line {e.lineno})",
                        "fix the file") from None
        return [(i + 1, r) for i, r in enumerate(rows) if _is_obj(path, i + 1, r)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        _is_obj(path, lineno, obj)
        out.append((lineno, obj))
    return out


def _is_obj(path: Path, lineno: int, obj: Any) -> bool:
    if not isinstance(obj, dict):
        raise _fail(path, f"line {lineno} is not a JSON object",
                    "expected JSONL: one JSON object per line")
    return True


def _read_parquet_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _fail(path, "reading parquet needs pyarrow", "pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise _fail(path, f"is not a readable parquet file ({e})", "check the file") from None
    return [(i + 1, r) for i, r in enumerate(rows)]


def _read_csv_rows(path: Path) -> list[tuple[int, dict]]:
    text = _read_text(path)
    if not text.strip():
        raise _fail(path, "is empty", "expected a CSV header and rows")
    header = text.split("\n", 1)[0]
    delimiter = ";" if header.count(";") > header.count(",") else ","
    if path.suffix.lower() == ".tsv" or header.count("\t") > max(header.count(","), header.count(";")):
        delimiter = "\t"
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    for row in reader:
        if None in row:  # more cells than header columns
            raise _fail(path, f"line {reader.line_num} has more cells than the header",
                        "fix the quoting or the delimiter")
        rows.append((reader.line_num, row))
    return rows


# ---------------------------------------------------------------- one loader per release


def _extras(row: dict[str, Any], used: set[str | None]) -> dict[str, Any]:
    # the unnamed first column of pandas-written CSVs is only a row number
    return {str(k): _json_safe(v) for k, v in row.items()
            if k not in used and str(k).strip() not in ("", "Unnamed: 0")}


def _make_item(path: Path, lineno: int, row: dict, prompt_keys: tuple[str, ...],
               source: str) -> ManifestItem | None:
    pkey, prompt = _get(row, *prompt_keys)
    prompt = _clean(prompt)
    if prompt is None:
        log.warning("%s: line %d has no prompt; skipped", path, lineno)
        return None
    ikey, index = _get(row, "index", "id", "key")
    ukey, url = _get(row, "url")
    lkey, raw_label = _get(row, "overfit_type", "type", "label")
    label = normalize_label(raw_label)
    extra = _extras(row, {pkey, ikey, ukey, lkey})
    if label is not None and _clean(raw_label) != label:
        extra["release_label"] = _clean(raw_label)
    item_id = _index_to_id(index) or prompt_id(prompt)
    return ManifestItem(id=item_id, prompt=prompt, url=_clean(url), label=label,
                        source=source, extra=extra)


def _require_column(path: Path, rows: list[tuple[int, dict]], names: tuple[str, ...]) -> None:
    if rows and _get(rows[0][1], *names)[0] is None:
        cols = ", ".join(repr(str(c)) for c in rows[0][1])
        raise _fail(path, f"has no {' / '.join(names)} column (columns: {cols})",
                    "is this the right release or format?")


def load_webster(path: str | os.PathLike) -> list[ManifestItem]:
    """Webster's ground-truth parquet or Wen et al.'s sdv1_500_memorized.jsonl."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".parquet":
        rows = _read_parquet_rows(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        rows = _read_csv_rows(path)
    else:
        rows = _read_json_rows(path)
    _require_column(path, rows, ("caption", "prompt"))
    return _finish(path, [_make_item(path, n, r, ("caption", "prompt"), "webster")
                          for n, r in rows])


def load_nemo(path: str | os.PathLike) -> list[ManifestItem]:
    """NeMo's ';'-separated prompt CSVs (memorized_laion_prompts.csv and its siblings)."""
    path = Path(path)
    _check_file(path)
    rows = _read_csv_rows(path)
    _require_column(path, rows, ("caption", "prompt"))
    items = []
    for lineno, row in rows:
        item = _make_item(path, lineno, row, ("caption", "prompt"), "nemo")
        if item is not None:
            for key in ("mean_sscd", "max_sscd"):  # scores are numbers, CSV made them text
                if key in item.extra:
                    item.extra[key] = _to_float(item.extra[key])
        items.append(item)
    return _finish(path, items)


def _to_float(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _parse_urls(path: Path, lineno: int, raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, list):
        return [u for u in (_clean(x) for x in raw) if u]
    text = str(raw).strip()
    if not text:
        return []
    if not text.startswith("["):
        return [text]
    try:
        value = ast.literal_eval(text)  # MemBench stores a Python list repr; never eval()
    except (ValueError, SyntaxError):
        raise _fail(path, f"line {lineno}: urls is not a list literal", "fix the cell") from None
    if not isinstance(value, (list, tuple)):
        raise _fail(path, f"line {lineno}: urls is not a list", "fix the cell")
    return [u for u in (_clean(x) for x in value) if u]


def load_membench(path: str | os.PathLike) -> list[ManifestItem]:
    """MemBench's SD1_final.csv: every prompt triggers a memorized image (label 'memorized')."""
    path = Path(path)
    _check_file(path)
    rows = _read_csv_rows(path)
    _require_column(path, rows, ("prompt", "caption"))
    items = []
    for lineno, row in rows:
        ukey, raw_urls = _get(row, "urls", "url")
        urls = _parse_urls(path, lineno, raw_urls)
        reduced = {k: v for k, v in row.items() if k != ukey}
        item = _make_item(path, lineno, reduced, ("prompt", "caption"), "membench")
        if item is not None:
            item.url = urls[0] if urls else None
            if len(urls) > 1:  # all of them are matches; the fetcher falls back along them
                item.extra["urls"] = urls
            item.label = item.label or "memorized"
        items.append(item)
    return _finish(path, items)


def load_prompts(path: str | os.PathLike) -> list[ManifestItem]:
    """One prompt per line; blank lines are skipped.

    No comment syntax: real memorized prompts start with '#' (MemBench has '##relieve ...').
    """
    path = Path(path)
    _check_file(path)
    items = []
    for line in _read_text(path).splitlines():
        prompt = line.strip()
        if prompt:
            items.append(ManifestItem(id=prompt_id(prompt), prompt=prompt, source="prompts"))
    return _finish(path, items)


def _finish(path: Path, items: list[ManifestItem | None]) -> list[ManifestItem]:
    kept = [it for it in items if it is not None]
    if not kept:
        raise _fail(path, "holds no prompts", "is this the right file?")
    return _unique_ids(path, kept)


def _unique_ids(path: Path, items: list[ManifestItem]) -> list[ManifestItem]:
    """Suffix repeated ids with #2, #3, ... in file order, so reruns give the same ids."""
    counts: dict[str, int] = {}
    repeats = 0
    for item in items:
        n = counts.get(item.id, 0) + 1
        counts[item.id] = n
        if n > 1:
            item.id = f"{item.id}#{n}"
            repeats += 1
    if repeats:
        log.warning("%s: %d repeated ids (same index or prompt) got a #N suffix", path, repeats)
    return items


# ---------------------------------------------------------------- detection and dispatch

_LOADERS: dict[str, Callable[[Path], list[ManifestItem]]] = {
    "webster": load_webster,
    "nemo": load_nemo,
    "membench": load_membench,
    "prompts": load_prompts,
    "manifest": read_manifest,
}


def detect_format(path: str | os.PathLike) -> str:
    """Guess a release's format from its extension and its first row's keys or columns."""
    path = Path(path)
    _check_file(path)
    ext = path.suffix.lower()
    if ext == ".txt":
        return "prompts"
    if ext == ".parquet":
        return "webster"
    if ext in (".jsonl", ".json", ".ndjson"):
        first = _read_json_rows(path)[:1]
        if not first:
            raise _fail(path, "is empty", "it needs at least one JSON object line")
        keys = {str(k).lower() for k in first[0][1]}
        # a manifest line missing its id must still reach read_manifest's clear message
        return "webster" if "caption" in keys and "prompt" not in keys else "manifest"
    if ext in (".csv", ".tsv"):
        rows = _read_csv_rows(path)
        cols = {str(c).strip().lower() for c in (rows[0][1] if rows else {})}
        if "caption" in cols:
            return "nemo"
        if "prompt" in cols:
            return "membench"
        raise _fail(path, "CSV has neither a Caption nor a prompt column",
                    f"pass fmt= one of {', '.join(FORMATS)}")
    raise _fail(path, f"cannot tell the format from the extension {ext or '(none)'!r}",
                f"pass fmt= one of {', '.join(FORMATS)}")


def load_release(path: str | os.PathLike, fmt: str | None = None,
                 default_label: str | None = None) -> list[ManifestItem]:
    """Load any supported release (auto-detected unless ``fmt`` is given) as ManifestItems.

    default_label fills items whose release gives no label (e.g. "N" for NeMo's
    unmemorized_laion_prompts.csv, "memorized" for Wen et al.'s jsonl).
    """
    path = Path(path).expanduser()
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in _LOADERS:
        raise ManifestError(f"unknown release format {fmt!r}; use one of {', '.join(FORMATS)}")
    items = _LOADERS[fmt](path)
    if default_label is not None:
        for item in items:
            item.label = item.label or default_label
    return items
