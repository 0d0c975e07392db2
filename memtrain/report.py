"""Reports: JSON, Markdown, image grids, experiment-tracker logging and an all-or-nothing
output folder. Generic on purpose (evaluate, the audit and the trainer all write through it):
nothing here knows what the figures mean.

Conventions:
- a metric that could not be computed is the dict `memtrain.metrics.not_computed(reason)`
  (`{"value": None, "status": "not computed", "reason": ...}`); every writer keeps it as such
  and never turns it into a number;
- images are torch tensors (3, H, W) in [0, 1], uint8 HWC arrays, or PIL images.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from memtrain.errors import MemtrainError

# ----------------------------------------------------------------------------- JSON


def is_not_computed(value: Any) -> bool:
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


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


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


# ----------------------------------------------------------------------------- trackers


def init_trackers(accelerator, project: str, config: Mapping[str, Any], run_dir: str | os.PathLike) -> None:
    """accelerator.init_trackers with every tracker's files under run_dir (W&B: run_dir/wandb).

    A tracker that cannot start (W&B without a login and without WANDB_MODE=offline) becomes a
    one-line MemtrainError instead of a traceback.
    """
    if not getattr(accelerator, "log_with", None):
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_kwargs = {"wandb": {"dir": str(run_dir)}, "tensorboard": {}}
    flat = {k: v for k, v in to_jsonable(dict(config)).items() if isinstance(v, (str, int, float, bool))}
    try:
        accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)
    except Exception as err:  # wandb raises its own types (UsageError, CommError, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MemtrainError(
            f"could not start experiment tracking ({type(err).__name__}: {first}); for W&B without an "
            "account set WANDB_MODE=offline, or drop --report_to"
        ) from None


def log_to_trackers(accelerator, figures: Mapping[str, Any], images: Mapping[str, Sequence[Any]] | None = None,
                    table: tuple[Sequence[str], Sequence[Sequence[Any]]] | None = None,
                    table_name: str = "items", step: int = 0) -> None:
    """Log scalar figures to every tracker; images (W&B: wandb.Image) and a table to the
    trackers that support them. No-op without trackers or off the main process."""
    trackers = list(getattr(accelerator, "trackers", []) or [])
    if not trackers or not accelerator.is_main_process:
        return
    accelerator.log(scalar_figures(figures), step=step)
    for tracker in trackers:
        if images and hasattr(tracker, "log_images") and tracker.name == "wandb":
            tracker.log_images({k: [to_pil(im) for im in v] for k, v in images.items()}, step=step)
        if table is not None and hasattr(tracker, "log_table"):
            columns, data = table
            clean = [[format_value(v) if is_not_computed(v) or isinstance(v, (list, dict)) else to_jsonable(v)
                      for v in row] for row in data]
            tracker.log_table(table_name, columns=list(columns), data=clean, step=step)


def finish_trackers(accelerator) -> None:
    """Close every tracker (W&B flushes its run folder) without accelerator.end_training(),
    which would also tear down the process group the other processes still use."""
    for tracker in list(getattr(accelerator, "trackers", []) or []):
        tracker.finish()
    if getattr(accelerator, "trackers", None):
        accelerator.trackers = []


# ----------------------------------------------------------------------------- output folder


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output folder unless overwrite (an empty one holds nothing
    to lose)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise MemtrainError(f"output path '{path}' exists and is a file: choose a folder name")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise MemtrainError(f"output dir '{path}' already exists: choose another or pass --overwrite")
    return path


class StagedOutput:
    """Write into a hidden sibling temp folder; `commit()` renames it into place, `abort()`
    deletes it. A failed or killed run therefore never leaves a half-written output, and an old
    output is replaced only once the new one is complete.

        with StagedOutput(out, overwrite) as tmp:
            write(tmp / "metrics.json")   # committed on normal exit, removed on exception
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = check_output_dir(path, overwrite).absolute()
        self.overwrite = overwrite
        self.tmp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"

    def open(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> Path:
        check_output_dir(self.path, self.overwrite)  # someone may have written there meanwhile
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
