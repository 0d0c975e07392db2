"""Utility (non-memorized) image-caption pairs for L_DM, read through `datasets`.

Formats: a memtrain manifest (.jsonl), parquet, an imagefolder with metadata.jsonl
(`file_name`, `text`) and webdataset .tar shards. All are resolved offline, decoded to RGB,
centre-cropped and resized to the model's pixel resolution and turned into [-1, 1] tensors.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image

from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import load_image, read_manifest
from memtrain.train.recipe import UtilitySpec


@dataclass
class Pair:
    """One image-caption pair."""

    image: Image.Image
    caption: str


def _files(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise MemtrainError(f"utility data: no {what} file matches '{pattern}'")
    return files


def _from_manifest(spec: UtilitySpec) -> list[Pair]:

    items = read_manifest(spec.path, require_images=True)
    return [Pair(load_image(item), item.prompt) for item in items]


def _from_datasets(spec: UtilitySpec) -> list[Pair]:


    datasets.disable_progress_bars()
    if spec.format == "imagefolder":
        if not Path(spec.path).is_dir():
            raise MemtrainError(f"utility data: imagefolder '{spec.path}' is not a folder")
        ds = datasets.load_dataset("imagefolder", data_dir=spec.path, split="train")
    elif spec.format == "parquet":
        ds = datasets.load_dataset("parquet", data_files=_files(spec.path, "parquet"), split="train")
    else:  # webdataset: columns are the member extensions (jpg/png, txt)
        ds = datasets.load_dataset("webdataset", data_files=_files(spec.path, ".tar"), split="train")
    columns = set(ds.column_names)
    image_col = _pick(columns, spec.image_column, ("image", "jpg", "png", "jpeg", "webp"), "image", spec)
    caption_col = _pick(columns, spec.caption_column, ("text", "txt", "caption"), "caption", spec)
    if not isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image())
    pairs = []
    for row in ds:
        caption = row[caption_col]
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        pairs.append(Pair(row[image_col], str(caption).strip()))
    return pairs


def _pick(columns: set[str], wanted: str, fallbacks: tuple[str, ...], what: str, spec: UtilitySpec) -> str:
    for name in (wanted, *fallbacks):
        if name in columns:
            return name
    raise MemtrainError(
        f"utility data '{spec.path}' has no {what} column '{wanted}' (columns: {', '.join(sorted(columns))}): "
        f"set utility.{what if what == 'image' else 'caption'}_column"
    )


def load_utility(spec: UtilitySpec) -> list[Pair]:
    """All utility pairs (capped at spec.max_items); none at all -> MemtrainError."""
    if not spec.path:
        raise MemtrainError("utility.path is empty: point it at the non-memorized training pairs")
    if spec.format == "manifest":
        pairs = _from_manifest(spec)
    else:
        pairs = _from_datasets(spec)
    if spec.max_items is not None:
        pairs = pairs[: spec.max_items]
    if not pairs:
        raise MemtrainError(f"utility data '{spec.path}' ({spec.format}) holds no image-caption pairs")
    return pairs
