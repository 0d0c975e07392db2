"""LAION-like manifests from the photos scikit-image ships, for full-size runs offline.

Real LAION pairs arrive in every size, mode and format; these eight photos are written the same
way (RGB, CMYK and grayscale JPEG/PNG/WebP, RGBA and palette PNG, 300 to 1000 px, none square
except three) so the image pipeline meets what a scraped dataset holds. With random weights
nothing is memorized: `memorized.jsonl` and `held_out.jsonl` are just two disjoint splits to
run the commands on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from memtrain.core.files import check_output_dir, staged_dir

# id, skimage.data function, file name, PIL mode to save in, caption, split
PHOTOS = [
    ("astronaut", "astronaut", "astronaut.png", "RGB", "an astronaut in a white suit with a flag", "memorized"),
    ("coffee", "coffee", "coffee.jpg", "CMYK", "a cup of coffee on a saucer", "memorized"),
    ("chelsea", "chelsea", "chelsea.webp", "RGB", "a tabby cat looking up", "memorized"),
    ("logo", "logo", "logo.png", "RGBA", "a snake logo on a transparent background", "memorized"),
    ("rocket", "rocket", "rocket.jpg", "RGB", "a rocket on the launch pad", "held_out"),
    ("camera", "camera", "camera.png", "L", "a black and white photo of a cameraman", "held_out"),
    ("hubble", "hubble_deep_field", "hubble.jpg", "RGB", "galaxies in the deep field", "held_out"),
    ("colorwheel", "colorwheel", "colorwheel.png", "P", "a colour wheel", "held_out"),
]


def write_photo_manifests(folder: str | Path, overwrite: bool = False) -> Path:
    """Write the photos and `memorized.jsonl` / `held_out.jsonl` (image paths relative to folder)."""
    import skimage.data

    folder = check_output_dir(folder, overwrite)
    with staged_dir(folder) as tmp:
        lines: dict[str, list[str]] = {"memorized": [], "held_out": []}
        for item_id, loader, name, mode, caption, split in PHOTOS:
            pixels = np.asarray(getattr(skimage.data, loader)())
            image = Image.fromarray(pixels)
            image = image.convert(mode) if mode != "P" else image.convert("RGB").quantize(64)
            image.save(tmp / name)
            lines[split].append(json.dumps({"id": item_id, "prompt": caption, "image": name}))
        for split, rows in lines.items():
            (tmp / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder
