"""Reports: JSON-ready values, Markdown, image grids. Generic on purpose (evaluate, the audit and the trainer all write through it):
nothing here knows what the figures mean.

Conventions:
- a metric that could not be computed is the dict `memtrain.metrics.not_computed(reason)`
  (`{"value": None, "status": "not computed", "reason": ...}`); every writer keeps it as such
  and never turns it into a number;
- images are torch tensors (3, H, W) in [0, 1], uint8 HWC arrays, or PIL images.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image


# ----------------------------------------------------------------------------- JSON

SCHEMA_VERSION = 1
"""The layout version of every command's report document (docs/reports.md lists the keys):
raised when a key is renamed, removed or changes meaning; adding a key keeps it."""


def versioned(doc: Mapping[str, Any]) -> dict:
    """A report document with `schema_version` as its first key (every writer stamps its top-level
    document through this before writing it)."""
    return {"schema_version": SCHEMA_VERSION, **{k: v for k, v in doc.items() if k != "schema_version"}}



@dataclass
class CommandResult:
    """A command's typed result: its report document, where it was written, or (--plan) the
    memory plan instead. Commands with richer results (the audit's rows) extend it."""

    report: dict
    output_dir: Path | None = None
    plan: dict | None = None
    message: str | None = None  # one line for the console besides the report

    @property
    def plan_text(self) -> str | None:
        return self.plan["plan_text"] if self.plan else None


def is_not_computed(value: Any) -> bool:
    """True for a `not_computed(reason)` record (a metric that could not be had)."""
    return isinstance(value, Mapping) and value.get("status") == "not computed"


def to_jsonable(obj: Any) -> Any:
    """numpy / torch / Path values -> plain JSON types; NaN and inf -> None (JSON has neither)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def scalar_figures(figures: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, float]:
    """Flatten nested figures to {"a/b": number} for trackers; lists, strings, None and
    not-computed entries are left out (a tracker would plot them as zeros or fail)."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if is_not_computed(value):
            continue
        if isinstance(value, Mapping):
            out.update(scalar_figures(value, name, sep))
        elif isinstance(value, (bool, np.bool_)):
            out[name] = float(value)
        elif isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value)):
            out[name] = float(value)
    return out


# ----------------------------------------------------------------------------- Markdown


def format_value(value: Any, digits: int = 3) -> str:
    """One table cell: numbers rounded, not-computed entries spelled out with their reason."""
    if is_not_computed(value):
        return f"not computed ({value.get('reason', 'no reason given')})"
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if math.isfinite(float(value)) else "-"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_value(v, digits)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v, digits) for v in value)
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   digits: int = 3) -> str:
    """Rows of dicts -> a Markdown table (columns default to the first row's keys)."""
    if not rows:
        return "_(no rows)_"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(format_value(row.get(c), digits)) for c in columns) + " |")
    return "\n".join(lines)


class MarkdownReport:
    """Append-only Markdown builder: report = MarkdownReport("Title"); report.table(...)."""

    def __init__(self, title: str):
        self.parts: list[str] = [f"# {title}"]

    def heading(self, text: str, level: int = 2) -> "MarkdownReport":
        self.parts.append(f"{'#' * level} {text}")
        return self

    def paragraph(self, text: str) -> "MarkdownReport":
        self.parts.append(text)
        return self

    def bullets(self, items: Iterable[str]) -> "MarkdownReport":
        items = list(items)
        if items:
            self.parts.append("\n".join(f"- {item}" for item in items))
        return self

    def key_values(self, values: Mapping[str, Any], digits: int = 3) -> "MarkdownReport":
        rows = [{"figure": k, "value": v} for k, v in values.items()]
        self.parts.append(markdown_table(rows, ["figure", "value"], digits))
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
              digits: int = 3) -> "MarkdownReport":
        self.parts.append(markdown_table(rows, columns, digits))
        return self

    def image(self, path: str, alt: str = "") -> "MarkdownReport":
        self.parts.append(f"![{alt}]({path})")
        return self

    def render(self) -> str:
        return "\n\n".join(self.parts) + "\n"

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path


# ----------------------------------------------------------------------------- image grids


def to_pil(image: Any) -> Image.Image:
    """A tensor (3, H, W) in [0, 1], a uint8 / [0, 1] float HWC array, or a PIL image -> RGB PIL."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).convert("RGB")


def thumbnail(image: Any, cell: int) -> Image.Image:
    """Square cell of `cell` px: tiny images are enlarged with nearest neighbour (pixels stay
    visible, as in the testbed's 32 px images), large ones shrunk smoothly."""
    pil = to_pil(image)
    small = max(pil.size) <= cell
    return pil.resize((cell, cell), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)


def image_grid(rows: Sequence[Sequence[Any | None]], cell: int = 128, pad: int = 2,
               background: str = "white") -> Image.Image:
    """Rows of images -> one picture; a None cell is left grey (e.g. a missing training image)."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    cols = max(len(r) for r in rows)
    step = cell + pad
    grid = Image.new("RGB", (cols * step + pad, len(rows) * step + pad), background)
    blank = Image.new("RGB", (cell, cell), (200, 200, 200))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(blank if image is None else thumbnail(image, cell), (pad + c * step, pad + r * step))
    return grid


def reference_rows(references: Sequence[Any | None], generations: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """The usual memorization layout: training image | its generations, one row per input."""
    if len(references) != len(generations):
        raise ValueError(f"{len(references)} reference images for {len(generations)} rows")
    return [[ref, *gens] for ref, gens in zip(references, generations)]


def save_grids(folder: str | os.PathLike, rows: Sequence[Sequence[Any]], row_names: Sequence[str],
               rows_per_grid: int = 8, cell: int = 128, prefix: str = "grid") -> list[tuple[Path, list[str]]]:
    """Write rows as PNG grids of at most rows_per_grid rows -> [(path, names of its rows)]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, start in enumerate(range(0, len(rows), rows_per_grid)):
        path = folder / f"{prefix}_{k:03d}.png"
        image_grid(rows[start : start + rows_per_grid], cell=cell).save(path)
        written.append((path, list(row_names[start : start + rows_per_grid])))
    return written
