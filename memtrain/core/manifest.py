"""The one manifest format memtrain reads and writes: JSONL, one item per line.

Each line is a JSON object with a required ``id`` and ``prompt``, an optional ``image`` (a
path relative to the manifest's folder, or absolute), and optional ``url``, ``label`` and
``source``. Any other keys are kept in ``ManifestItem.extra`` and written back unchanged, so
release-specific fields (SSCD scores, alternative URLs, ...) survive a round trip.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageOps

from memtrain.core.errors import MemtrainError
from memtrain.core.files import atomic_write_text

log = logging.getLogger(__name__)

# Read before decoding: a 50 MB PNG can hold a 50-gigapixel image. SD trains at <= 1024 px; LAION's
# largest photos are a few tens of megapixels.
MAX_IMAGE_PIXELS = 64_000_000
KNOWN_KEYS = ("id", "prompt", "image", "url", "label", "source")
_OPTIONAL_STR_KEYS = ("image", "url", "label", "source")


class ManifestError(MemtrainError, ValueError):
    """A manifest or release file that cannot be used; the message names the file and the fix."""


@dataclass
class ManifestItem:
    """One manifest line: id, prompt, image path (optional), URL, label, source and extra fields."""

    id: str
    prompt: str
    image: str | None = None
    url: str | None = None
    label: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        """JSON-ready dict; ``image`` is made relative to ``base_dir`` when it lies inside it."""
        out: dict[str, Any] = {"id": self.id, "prompt": self.prompt}
        if self.image is not None:
            out["image"] = _relative_image(self.image, base_dir)
        for key in ("url", "label", "source"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        for key, value in self.extra.items():
            if key not in out and key not in KNOWN_KEYS:  # known fields always win
                out[key] = value
        return out


class Manifest(list):
    """A list of ManifestItem that also says where it came from and which items were skipped.

    It is a plain ``list`` for every caller; ``missing`` holds the items dropped by
    ``read_manifest(require_images=True)`` because their image file does not exist.
    """

    def __init__(self, items: Iterable[ManifestItem] = (), path: Path | None = None,
                 missing: list[ManifestItem] | None = None):
        super().__init__(items)
        self.path = path
        self.missing: list[ManifestItem] = list(missing or [])


def _relative_image(image: str, base_dir: str | os.PathLike | None) -> str:
    if base_dir is None:
        return image
    absolute = Path(os.path.abspath(image))
    base = Path(os.path.abspath(base_dir))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        pass
    try:  # a sibling folder (dataset/manifests + dataset/images): "../images/x.png" moves with it
        return "../" + absolute.relative_to(base.parent).as_posix()
    except ValueError:  # elsewhere: keep it absolute so it still resolves
        return str(absolute)


def _fail(path: Path, lineno: int | None, what: str, fix: str) -> ManifestError:
    where = f"{path}:{lineno}" if lineno is not None else str(path)
    return ManifestError(f"{where}: {what}; {fix}")


def _parse_line(path: Path, lineno: int, line: str) -> ManifestItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise _fail(path, lineno, f"line {lineno} is not a JSON object",
                    "a manifest is JSONL: one JSON object per line")
    raw_id = obj.get("id")
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)  # release indices are often numbers; ids are strings
    if not isinstance(raw_id, str) or not raw_id.strip():
        raise _fail(path, lineno, f"line {lineno} has no \"id\" (a non-empty string)",
                    "give every item a unique id")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise _fail(path, lineno, f"line {lineno} has no \"prompt\" (a string)",
                    "give every item its text prompt")
    values: dict[str, str | None] = {}
    for key in _OPTIONAL_STR_KEYS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise _fail(path, lineno, f"line {lineno}: \"{key}\" must be a string or null",
                        f"fix the \"{key}\" field")
        values[key] = value
    if any(ord(c) < 32 or c == "\x7f" for c in raw_id):
        raise _fail(path, lineno, f"line {lineno}: id {raw_id!r} holds control characters",
                    "ids are names: printable text only")
    if values["image"] is not None:
        image = Path(values["image"]).expanduser()
        if not image.is_absolute():
            # relative paths stay inside the dataset: the manifest's folder, or the folder above
            # it for the dataset/manifests + dataset/images layout write_manifest produces
            root = path.parent.parent.resolve()
            if not (path.parent / image).resolve().is_relative_to(root):
                raise _fail(path, lineno, f"line {lineno}: image {values['image']!r} points outside the "
                            f"manifest's dataset folder {root}", "keep images inside it, or give an absolute path")
        values["image"] = os.path.normpath(image if image.is_absolute() else path.parent / image)
    extra = {k: v for k, v in obj.items() if k not in KNOWN_KEYS}
    return ManifestItem(id=raw_id, prompt=prompt, extra=extra, **values)


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise _fail(path, None, "manifest file not found", "check the path")
    if path.is_dir():
        raise _fail(path, None, "is a folder, not a manifest file",
                    "pass the .jsonl file inside it")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise _fail(path, None, "is not UTF-8 text", "a manifest is UTF-8 JSONL") from None


def read_manifest(path: str | os.PathLike, require_images: bool = False,
                  strict: bool = False) -> list[ManifestItem]:
    """Read a JSONL manifest; ``image`` paths come back absolute.

    require_images: drop items whose image file is missing (logged, and listed in the
    returned ``Manifest.missing``); with strict=True a missing image raises instead.
    """
    path = Path(path).expanduser().absolute()
    items: list[ManifestItem] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no item
        item = _parse_line(path, lineno, line)
        if item.id in seen:
            raise _fail(path, lineno, f"duplicate id {item.id!r} (first on line {seen[item.id]})",
                        "ids must be unique")
        seen[item.id] = lineno
        items.append(item)
    if not items:
        raise _fail(path, None, "manifest is empty", "it needs at least one JSON object line")
    if not require_images:
        return Manifest(items, path=path)
    return _keep_items_with_images(path, items, strict)


def _keep_items_with_images(path: Path, items: list[ManifestItem], strict: bool) -> Manifest:
    present, missing = [], []
    for item in items:
        ok = item.image is not None and Path(item.image).is_file()
        (present if ok else missing).append(item)
        if not ok and strict:
            what = "has no image" if item.image is None else f"image not found: {item.image}"
            raise _fail(path, None, f"item {item.id!r} {what}",
                        "fetch it (memtrain fetch) or drop strict")
    if missing:
        ids = ", ".join(repr(m.id) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        log.warning("%s: skipped %d of %d items whose image file is missing: %s",
                    path, len(missing), len(items), ids)
    if not present:
        raise _fail(path, None, f"none of the {len(items)} items has an existing image file",
                    "fetch them with memtrain fetch")
    return Manifest(present, path=path, missing=missing)


def write_manifest(path: str | os.PathLike, items: Iterable[ManifestItem]) -> Path:
    """Write items as JSONL atomically (temp file in the same folder, then os.replace).

    Image paths inside the manifest's folder are stored relative to it, so the folder can be
    moved as a whole; others are stored absolute (a relative ``item.image`` is taken relative
    to the current directory). Returns the manifest's absolute path.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines, seen = [], set()
    for item in items:
        if item.id in seen:  # never write a file read_manifest would refuse
            raise _fail(path, None, f"duplicate id {item.id!r} in the items to write",
                        "ids must be unique")
        seen.add(item.id)
        lines.append(json.dumps(item.to_dict(path.parent), ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def to_rgb(im) -> "Image.Image":
    """Any PIL image as 8-bit RGB the way it looks: EXIF orientation applied, 16-bit and 32-bit
    grey scaled down instead of clipped, CMYK / palette / alpha converted (animated: first frame)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit data spans 0..65535; float images usually 0..1; anything else is already 8-bit
        peak = 65535.0 if arr.max() > 255 else 1.0 if im.mode == "F" and arr.max() <= 1 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    return im.convert("RGB")


def load_image(item: ManifestItem):
    """Open an item's image as an RGB ``PIL.Image`` (`to_rgb`); ManifestError names the file if
    it cannot."""
    if item.image is None:
        raise ManifestError(f"item {item.id!r} has no image; fetch it with "
                            "memtrain fetch or add an \"image\" path")
    try:
        with Image.open(item.image) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS or im.width < 1 or im.height < 1:
                raise ManifestError(f"{item.image}: image of item {item.id!r} is {im.width}x{im.height} pixels "
                                    f"(allowed: 1 to {MAX_IMAGE_PIXELS} pixels, a decompression bomb guard); "
                                    "replace it with a smaller copy")
            return to_rgb(im)
    except FileNotFoundError:
        raise ManifestError(f"{item.image}: image of item {item.id!r} not found; "
                            "fetch it or fix the path") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ManifestError(f"{item.image}: image of item {item.id!r} cannot be read "
                            f"({type(e).__name__}: {e}); re-fetch or replace it") from None
