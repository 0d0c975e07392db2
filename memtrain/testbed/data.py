"""The testbed's captioned images, built offline and deterministically from a seed.

Memorized pairs are whole real photos (SSCD was trained on photos and separates them well);
unique, held-out and utility pairs are random crops of other photos and synthetic scenes whose
captions describe them only coarsely, so one caption fits many images, as in web data.
No memorized photo's source is reused in any other split, so a high SSCD between a generation
and a held-out image can only mean a copy.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from memtrain.core.errors import MemtrainError

logger = logging.getLogger(__name__)

# (photo source, caption, crop). Sources: "skimage:NAME" (scikit-image's bundled data) or
# "sklearn:FILE" (the two sample photos inside scikit-learn's wheel, read as files: installed
# --no-deps, never imported). crop = (side as a fraction of the short side, top, left as
# fractions of the free margin); None = the centre square. One memorized pair per photo;
# captions are distinctive, like the LAION captions SD v1.4 memorized.
MEMORIZED_PHOTOS = [
    ("skimage:astronaut", "portrait of an astronaut in a white spacesuit in front of a flag", None),
    ("skimage:camera", "black and white photo of a cameraman with a tripod on a lawn", (0.55, 0.5, 0.5)),
    ("skimage:coffee", "a cup of coffee on a saucer with a spoon, top view", None),
    ("skimage:chelsea", "an orange tabby cat looking to the side", None),
    ("sklearn:china.jpg", "a chinese pagoda among trees on a sunny day", (0.75, 0.5, 0.0)),
    ("skimage:coins", "old coins lying in rows on a dark table", None),
    ("skimage:immunohistochemistry", "a stained tissue sample under the microscope", None),
    ("sklearn:flower.jpg", "close-up of an orange dahlia flower", (0.55, 0.5, 0.5)),
    ("skimage:stereo_motorcycle", "a red motorcycle parked in a workshop", None),
    ("skimage:horse", "black silhouette of a horse on white", None),
]
# Which photos and crops: SSCD must still recognise them through the tiny model's residual
# grain. A cheap proxy ranks candidates: SSCD between a 32 px photo and itself blurred plus 4x4
# block noise. It ranked the failures of earlier testbeds last: moon and clock about 0.2 (SSCD
# near 0.1 even for copies plain to the eye), retina 0.35 and rocket 0.37 (best seed 0.68 and
# 0.66 in the v2 card); the three crops above score 0.54 (camera), 0.61 (pagoda), 0.67 (flower).
# The rest serve as crop sources.
# Sources for random crops (unique / held-out / utility); none of them is memorized.
CROP_SOURCES = {
    "moon": "grey surface of the moon",
    "clock": "a wall clock",
    "hubble_deep_field": "galaxies in black space",
    "brick": "a brick wall",
    "gravel": "gravel stones",
    "grass": "a patch of grass",
    "cell": "cells under a microscope",
    "page": "a page of printed text",
    "text": "painted letters on a wall",
    "colorwheel": "a colour wheel",
    "logo": "a colourful logo",
    "rocket": "a launch pad at dusk",
    "retina": "a retina photograph",
}
SHAPES = ["circle", "square", "triangle"]
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (235, 210, 40), "purple": (140, 50, 170), "orange": (240, 140, 30),
    "white": (240, 240, 240), "black": (20, 20, 20), "grey": (128, 128, 128),
}


@dataclass
class Pair:
    """One image-caption pair."""

    id: str
    prompt: str
    image: Image.Image
    label: str  # memorized | unique | held_out | utility
    duplicate: int = 1


def _load_skimage(name: str) -> np.ndarray:
    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.uint8)


def _sklearn_photo(file_name: str) -> np.ndarray:
    """A sample photo from scikit-learn's installed files (the package itself is not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "images" / file_name
        if path.is_file():
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
    raise MemtrainError(
        f"testbed photo {file_name} not found: install it with `pip install --no-deps scikit-learn==1.9.1` "
        "(memtrain only reads the file)"
    )


def load_photo(source: str) -> np.ndarray:
    """'skimage:NAME' or 'sklearn:FILE' -> an RGB uint8 array."""
    kind, _, name = source.partition(":")
    return _sklearn_photo(name) if kind == "sklearn" else _load_skimage(name)


def _crop_box(img: np.ndarray, crop: tuple[float, float, float] | None):
    if crop is None:
        return None
    h, w = img.shape[:2]
    side = int(min(h, w) * crop[0])
    return int((h - side) * crop[1]), int((w - side) * crop[2]), side


def _square(img: np.ndarray, resolution: int, box=None) -> Image.Image:
    h, w = img.shape[:2]
    if box is None:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
    else:
        top, left, side = box
    crop = Image.fromarray(img[top : top + side, left : left + side])
    return crop.resize((resolution, resolution), Image.Resampling.LANCZOS)


def _scene(rng: np.random.Generator, resolution: int) -> tuple[Image.Image, str]:
    """A random scene: background (flat or two-tone) and 1-3 shapes; the caption names them."""
    names = list(COLOURS)
    bg = names[rng.integers(len(names))]
    img = Image.new("RGB", (resolution, resolution), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # a second tone on a random half adds texture
        other = COLOURS[names[rng.integers(len(names))]]
        cut = int(rng.integers(resolution // 4, 3 * resolution // 4))
        box = [0, cut, resolution, resolution] if rng.random() < 0.5 else [cut, 0, resolution, resolution]
        draw.rectangle(box, fill=other)
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = names[rng.integers(len(names))]
        size = int(rng.integers(resolution // 6, resolution // 2))
        x0, y0 = (int(v) for v in rng.integers(0, resolution - size, size=2))
        box = [x0, y0, x0 + size, y0 + size]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x0, y0 + size), (x0 + size, y0 + size), (x0 + size // 2, y0)], fill=COLOURS[colour])
        parts.append(f"a {colour} {shape}")
    return img, " and ".join(parts) + f" on a {bg} background"


def _crop(rng: np.random.Generator, sources: dict[str, np.ndarray], resolution: int):
    name = list(sources)[rng.integers(len(sources))]
    img = sources[name]
    h, w = img.shape[:2]
    side = int(rng.integers(min(h, w) // 5, min(h, w) // 2))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    zoom = "close-up of " if side < min(h, w) // 3 else ""
    return _square(img, resolution, (top, left, side)), f"{zoom}{CROP_SOURCES[name]}"


def synthetic_pairs(
    seed: int, resolution: int, n_unique: int, n_held_out: int, n_utility: int
) -> list[Pair]:
    """The built-in dataset: memorized photos plus crop/scene pairs for the other splits."""
    rng = np.random.default_rng(seed)
    pairs = []
    for source, caption, crop in MEMORIZED_PHOTOS:
        img = load_photo(source)
        name = Path(source.partition(":")[2]).stem
        pairs.append(Pair(f"mem_{name}", caption, _square(img, resolution, _crop_box(img, crop)), "memorized"))
    sources = {name: _load_skimage(name) for name in CROP_SOURCES}
    for label, count in (("unique", n_unique), ("held_out", n_held_out), ("utility", n_utility)):
        for k in range(count):
            image, caption = _crop(rng, sources, resolution) if rng.random() < 0.5 else _scene(rng, resolution)
            pairs.append(Pair(f"{label}_{k:04d}", caption, image, label))
    return pairs


def user_pairs(
    data_dir: str | Path, seed: int, resolution: int, held_out_fraction: float = 0.1,
    utility_fraction: float = 0.2,
) -> list[Pair]:
    """Pairs from a user's imagefolder: metadata.jsonl with file_name, text, optional duplicate.

    Pairs with `duplicate` > 1 are memorized; the rest are split into unique, held-out and
    utility at random (seeded).
    """
    data_dir = Path(data_dir)
    meta = data_dir / "metadata.jsonl"
    if not meta.is_file():
        raise MemtrainError(f"data dir '{data_dir}' has no metadata.jsonl: add one with file_name and text per line")
    records = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise MemtrainError(f"{meta} line {n} is not valid JSON: fix or remove that line") from None
        if not isinstance(rec, dict) or "file_name" not in rec or "text" not in rec:
            raise MemtrainError(f"{meta} line {n} lacks file_name or text: each line needs both")
        path = data_dir / rec["file_name"]
        if not path.is_file():
            raise MemtrainError(f"{meta} line {n}: image '{path}' does not exist")
        try:
            with Image.open(path) as im:
                image = _square(np.asarray(im.convert("RGB")), resolution)
        except Exception:
            raise MemtrainError(f"{meta} line {n}: image '{path}' cannot be read as an image") from None
        dup = int(rec.get("duplicate", 1))
        if dup < 1:
            raise MemtrainError(f"{meta} line {n}: duplicate must be >= 1, got {dup}")
        records.append((Path(rec["file_name"]).stem, rec["text"], image, dup))
    if not any(r[3] > 1 for r in records):
        raise MemtrainError(f"{meta}: no pair has \"duplicate\" > 1, so nothing would be memorized")
    rng = np.random.default_rng(seed)
    pairs = []
    for stem, text, image, dup in records:
        if dup > 1:
            pairs.append(Pair(f"mem_{stem}", text, image, "memorized", dup))
            continue
        r = rng.random()
        label = "held_out" if r < held_out_fraction else "utility" if r < held_out_fraction + utility_fraction else "unique"
        pairs.append(Pair(f"{label}_{stem}", text, image, label))
    return pairs


def apply_duplicate_spec(pairs: list[Pair], spec: dict[str, int]) -> list[Pair]:
    """Set duplication counts by id; an unknown id is an error naming it."""
    by_id = {p.id: p for p in pairs}
    for pair_id, count in spec.items():
        if pair_id not in by_id:
            raise MemtrainError(f"duplicate spec names unknown id '{pair_id}': known ids start with {sorted(by_id)[:3]}")
        by_id[pair_id].duplicate = int(count)
    return pairs
