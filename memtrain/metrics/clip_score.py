"""Image-text alignment (A_CLIP / CLIPScore) and LPIPS diversity, each only with user weights.

No registry package ships CLIP image/text weights or LPIPS backbones, so both take a path the
user supplies and raise MetricBackendError otherwise; reports then record `not_computed(reason)`
instead of a number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from memtrain.core.text import tokenize
from memtrain.metrics.sscd import MetricBackendError, device_name, to_uint8_images


def not_computed(reason: str) -> dict[str, Any]:
    """The report entry for a metric that could not be computed, and why."""
    return {"value": None, "status": "not computed", "reason": reason}


@runtime_checkable
class AlignmentScorer(Protocol):
    """Anything scoring image i against text i; returns raw cosines [N]."""

    name: str

    def score(self, images: Any, texts: Sequence[str]) -> np.ndarray:
        ...


def clipscore_from_cosine(cos: Any) -> np.ndarray:
    """CLIPScore convention (Hessel et al. 2021, w = 1 scaled to 100): 100 * max(cos, 0)."""
    return 100.0 * np.maximum(np.asarray(cos, dtype=np.float64), 0.0)


class _TorchThreads:
    """Temporarily cap torch's intra-op threads (the machines are shared)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> None:
        import torch

        self.prev = torch.get_num_threads()
        torch.set_num_threads(min(self.prev, self.n))

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_num_threads(self.prev)


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class ClipScorer:
    """A_CLIP with a transformers CLIPModel folder the user supplies (offline).

    A folder with an image processor (preprocessor_config.json) is fed through CLIPProcessor,
    as CLIP ViT-L/14 expects. A CLIPModel folder without one (memtrain's testbed CLIP, trained
    on [-1, 1] pixels at its vision tower's resolution, no processor) is fed exactly that way;
    such numbers compare only with runs of the same CLIP.

    device: where CLIP runs (None = the CPU); pixels and token ids go there, cosines come back.
    `placement` names it for the reports."""

    def __init__(self, model_dir: str | Path, batch_size: int = 16, num_threads: int = 2, device: Any = None):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise MetricBackendError(f"CLIP weights folder not found: {self.model_dir} (A_CLIP needs a CLIPModel folder)")
        self.raw_pixels = not any((self.model_dir / f).is_file() for f in PROCESSOR_FILES)
        self.batch_size = batch_size if not self.raw_pixels else max(batch_size, 64)
        self.num_threads = num_threads
        self.device = device_name(device)
        self.placement = f"{self.device} (transformers)"
        self.name = (f"clip-raw:{self.model_dir.parent.name}" if self.raw_pixels else f"clip:{self.model_dir.name}")
        self.model, self.processor, self.tokenizer = self._load()

    def _load(self) -> tuple[Any, Any, Any]:
        from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

        try:
            model = CLIPModel.from_pretrained(str(self.model_dir), local_files_only=True).eval().to(self.device)
            if self.raw_pixels:
                return model, None, CLIPTokenizer.from_pretrained(str(self.model_dir))
            return model, CLIPProcessor.from_pretrained(str(self.model_dir), local_files_only=True), None
        except Exception as e:  # missing files, wrong architecture: one line naming the folder
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MetricBackendError(f"cannot load CLIP from {self.model_dir}: {first}") from e

    def _raw_embeddings(self, images: list[np.ndarray], texts: list[str]):
        """Towers + projections called directly on [-1, 1] pixels at the tower's resolution."""
        import torch
        import torch.nn.functional as F

        size = int(self.model.config.vision_config.image_size)
        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
        img = self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output)
        ids = tokenize(self.tokenizer, texts).to(self.device)
        txt = self.model.text_projection(self.model.text_model(input_ids=ids).pooler_output)
        return img, txt

    def _batch_cosine(self, images: list[np.ndarray], texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self.raw_pixels:
                img, txt = self._raw_embeddings(images, texts)
            else:
                inputs = self.processor(text=texts, images=[Image.fromarray(im) for im in images],
                                        return_tensors="pt", padding=True, truncation=True).to(self.device)
                out = self.model(**inputs, return_dict=True)
                img, txt = out.image_embeds, out.text_embeds
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        return (img * txt).sum(-1).double().cpu().numpy()

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

    def clipscore(self, images: Any, texts: Sequence[str]) -> np.ndarray:
        """CLIPScore 100 * max(cos, 0) -> [N]."""
        return clipscore_from_cosine(self.score(images, texts))


def get_alignment_scorer(model_dir: str | Path | None, device: Any = None) -> AlignmentScorer:
    """ClipScorer for a folder on `device` (None = the CPU), or MetricBackendError when none was given."""
    if model_dir is None:
        raise MetricBackendError("A_CLIP not computed: no CLIP weights given (none ship offline); pass a CLIPModel folder")
    return ClipScorer(model_dir, device=device)


# ----------------------------------------------------------------------------- LPIPS


def _load_lpips(weights_path: str | Path | None) -> Any:
    if weights_path is None:
        raise MetricBackendError(
            "LPIPS not computed: no LPIPS weights ship offline (the lpips package downloads its "
            "backbone); pass a TorchScript LPIPS file"
        )
    path = Path(weights_path)
    if not path.is_file():
        raise MetricBackendError(f"LPIPS TorchScript file not found: {path}")
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise MetricBackendError(f"cannot load LPIPS TorchScript {path}: {str(e).splitlines()[0]}") from e


def _to_lpips_tensor(images: Any) -> Any:
    import torch

    arr = np.stack(to_uint8_images(images)).astype(np.float32) / 127.5 - 1.0  # LPIPS wants [-1, 1]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def lpips_diversity(images_per_input: Sequence[Any], weights_path: str | Path | None = None,
                    num_threads: int = 2) -> np.ndarray:
    """Mean pairwise LPIPS distance across the seeds of each input -> [N] (higher = more diverse).

    weights_path: a TorchScript module called as f(x0, x1) on [B,3,H,W] tensors in [-1, 1]
    (same size within an input) returning B distances (any shape with B elements), as the
    `lpips` package's LPIPS module does once scripted. Without it: MetricBackendError.
    """
    import torch

    model = _load_lpips(weights_path)
    out = []
    with _TorchThreads(num_threads), torch.inference_mode():
        for images in images_per_input:
            x = _to_lpips_tensor(images)
            i, j = np.triu_indices(len(x), k=1)
            if len(i) == 0:
                raise ValueError("LPIPS diversity needs at least 2 images per input")
            d = model(x[torch.from_numpy(i)], x[torch.from_numpy(j)])
            out.append(float(d.reshape(len(i)).double().mean()))
    return np.asarray(out)
