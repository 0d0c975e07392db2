"""A_CLIP on the testbed, with the testbed's own tiny CLIP (its `clip/` folder).

The testbed's CLIP was trained contrastively on the testbed's captions, with images in
[-1, 1] at the testbed resolution and no CLIPProcessor (so `ClipScorer`, which needs a
processor config, cannot read the folder). This scorer feeds both towers exactly as they were
trained, which makes image-text alignment measurable offline on the testbed. Its numbers are
only comparable with other testbed runs, never with CLIP ViT-L/14 scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from memtrain.metrics.clip_score import _TorchThreads
from memtrain.metrics.sscd import MetricBackendError, to_uint8_images


def is_testbed_clip(folder: str | Path) -> bool:
    """A CLIPModel folder with a tokenizer but no image processor: the testbed's layout."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file() or (folder / "preprocessor_config.json").is_file():
        return False
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return False
    return model_type == "clip" and (folder / "tokenizer_config.json").is_file()


class TestbedClipScorer:
    """AlignmentScorer: cosine of the testbed CLIP's image and text embeddings, per pair."""

    __test__ = False  # not a pytest class despite the name

    def __init__(self, folder: str | Path, batch_size: int = 64, num_threads: int = 2):
        self.folder = Path(folder)
        if not is_testbed_clip(self.folder):
            raise MetricBackendError(
                f"{self.folder} is not a testbed CLIP folder (config.json of a CLIPModel and a tokenizer, "
                "no preprocessor_config.json)"
            )
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.name = f"testbed-clip:{self.folder.parent.name}"
        self.model, self.tokenizer = self._load()
        self.resolution = int(self.model.config.vision_config.image_size)

    def _load(self) -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPTokenizer

        try:
            model = CLIPModel.from_pretrained(str(self.folder), local_files_only=True).eval()
            tokenizer = CLIPTokenizer.from_pretrained(str(self.folder))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MetricBackendError(f"cannot load the testbed CLIP from {self.folder}: {first}") from e
        return model, tokenizer

    def _pixels(self, images: list[np.ndarray]) -> Any:
        """uint8 HWC -> (B, 3, R, R) in [-1, 1], the range the towers were trained on."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic",
                              align_corners=False, antialias=True).clamp(-1, 1)
        return x

    def _batch_cosine(self, images: list[np.ndarray], texts: list[str]) -> np.ndarray:
        import torch

        from memtrain.text import tokenize

        model = self.model
        with torch.inference_mode():
            # Towers + projections called directly: stable across transformers' return types.
            img = model.visual_projection(model.vision_model(pixel_values=self._pixels(images)).pooler_output)
            ids = tokenize(self.tokenizer, texts)
            txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        return (img * txt).sum(-1).double().numpy()

    def score(self, images: Any, texts: Sequence[str]) -> np.ndarray:
        """Raw cosine(image_i, text_i) -> [N]."""
        imgs = to_uint8_images(images)
        texts = list(texts)
        if len(imgs) != len(texts):
            raise ValueError(f"{len(imgs)} images but {len(texts)} texts")
        out = []
        with _TorchThreads(self.num_threads):
            for s in range(0, len(imgs), self.batch_size):
                out.append(self._batch_cosine(imgs[s : s + self.batch_size], texts[s : s + self.batch_size]))
        return np.concatenate(out) if out else np.zeros(0)
