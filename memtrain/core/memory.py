"""Batch sizes that fit: per-row memory costs measured on the meta device, and a plan per stage.

A stage's cost per row (one U-Net row with or without gradients, one image through the VAE) is
measured by running the model's own config on the `meta` device, batch 1 and batch 2, under a
dispatch mode that tracks the bytes of live tensors: no weights, no memory, well under a
second for SD v1.4 at 512 px. Attention is counted as a fused kernel (flash / memory-efficient
SDPA, which CUDA and recent CPU builds use), not as the (tokens x tokens) matrix. A plan then
gives each stage the largest batch whose estimated peak (weights + batch x row cost, within 90%
of the budget: allocator fragmentation and kernels' workspaces take the rest) fits, capped by
what the stage asks for. `--plan` prints it; the commands use it; an out-of-memory error at run
time halves the chunk once (memtrain.core.runtime.run_in_chunks).
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import CLIPTextConfig, CLIPTextModel

from memtrain.core.bundle import ModelBundle, codec_class, quiet_diffusers, resolve_model_path
from memtrain.core.errors import MemtrainError
from memtrain.core.runtime import DTYPE_NAMES, resolve_runtime

USABLE_FRACTION = 0.9  # of the budget; the rest is the allocator's and the kernels' headroom
GB = 1e9

# What each stage's "row" is, for the printed plan.
STAGE_UNITS = {
    "generation": "images (2 U-Net rows each: classifier-free guidance)",
    "attack": "U-Net rows with gradients (targets x noise samples)",
    "unet_loss": "U-Net rows without gradients (held-out loss)",
    "vae_encode": "images",
    "vae_decode": "images",
    "finetune": "U-Net rows with weight gradients (surrogate + utility batch)",
}


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created by ops (views and in-place results not counted again)
    and the peak of their sum while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(tree_flatten(out)[0]):
            if not isinstance(t, torch.Tensor) or func.is_view:
                continue
            if i < len(returns) and returns[i].alias_info is not None:
                continue
            n = t.numel() * t.element_size()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
        return out


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """On meta tensors SDPA falls back to the math path (a tokens x tokens matrix); count it as
    the fused kernel a real run uses (output + log-sum-exp saved)."""
    original = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is None and dropout_p == 0.0 and q.device.type == "meta" and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=is_causal,
                                                                              scale=scale)[0]
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _peak_bytes(run) -> int:
    mode = _LiveBytes()
    with _fused_attention(), mode:
        run()
    return mode.peak


def _meta_module(cls, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"), quiet_diffusers():
        module = cls.from_config(config)
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def module_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of a module's parameters and buffers (in `dtype` when given)."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() else \
            t.element_size()
        total += t.numel() * size
    return total


@functools.lru_cache(maxsize=32)
def _unet_row_cached(cls, config_json: str, latent: int, dtype: torch.dtype, mode: str,
                     text_len: int, text_dim: int) -> int:
    unet = _meta_module(cls, json.loads(config_json), dtype)
    if mode == "finetune":
        unet.requires_grad_(True)
    peaks = []
    for b in (1, 2):
        def run(b=b):
            x = torch.empty(b, unet.config.in_channels, latent, latent, device="meta", dtype=dtype)
            y = torch.empty(b, text_len, text_dim, device="meta", dtype=dtype, requires_grad=mode == "attack")
            t = torch.zeros(b, device="meta", dtype=torch.long)
            with torch.set_grad_enabled(mode != "inference"):
                out = unet(x, t, encoder_hidden_states=y).sample
                if out.requires_grad:  # a U-Net without cross-attention has nothing to attack
                    out.float().pow(2).mean().backward()
        peaks.append(_peak_bytes(run))
    return max(1, peaks[1] - peaks[0])


def unet_row_bytes(unet, latent_size: int, dtype: torch.dtype, mode: str = "inference",
                   text_len: int = 77) -> int:
    """Bytes one more U-Net row costs at this latent size and dtype. mode: inference (no grad),
    attack (gradient to the text embedding only), finetune (gradients to the weights)."""
    if mode not in ("inference", "attack", "finetune"):
        raise ValueError(f"unknown mode {mode}")
    config = json.dumps(dict(unet.config), sort_keys=True, default=str)
    return _unet_row_cached(type(unet), config, int(latent_size), dtype, mode, text_len,
                            int(unet.config.cross_attention_dim))


@functools.lru_cache(maxsize=32)
def _vae_row_cached(cls, config_json: str, pixels: int, latent: int, channels: int, dtype: torch.dtype,
                    decode: bool) -> int:
    vae = _meta_module(cls, json.loads(config_json), dtype)
    bundle = ModelBundle(None, None, None, vae, None)
    peaks = []
    for b in (1, 2):
        def run(b=b):
            with torch.no_grad():
                if decode:
                    bundle.decode_latents(torch.empty(b, channels, latent, latent, device="meta", dtype=dtype))
                else:
                    bundle.encode_images(torch.empty(b, 3, pixels, pixels, device="meta", dtype=dtype))
        peaks.append(_peak_bytes(run))
    return max(1, peaks[1] - peaks[0])


def vae_row_bytes(vae, pixels: int, latent: int, channels: int, dtype: torch.dtype, decode: bool) -> int:
    """Bytes one more image costs through the autoencoder (or registered codec); `channels`:
    the latents' (the U-Net's in_channels)."""
    config = json.dumps(dict(vae.config), sort_keys=True, default=str)
    return _vae_row_cached(type(vae), config, int(pixels), int(latent), int(channels), dtype, bool(decode))


@dataclass
class StagePlan:
    """One stage: the batch it will use, its cost per row and the estimated peak."""

    batch: int
    wanted: int
    row_gb: float
    peak_gb: float


@dataclass
class MemoryPlan:
    """Batch sizes per stage for one model, resolution, dtype and budget."""

    device: str
    dtype: str
    resolution: int
    budget_gb: float
    weights_gb: float
    stages: dict[str, StagePlan] = field(default_factory=dict)

    def batch(self, stage: str) -> int:
        return self.stages[stage].batch

    @property
    def peak_gb(self) -> float:
        return max((s.peak_gb for s in self.stages.values()), default=self.weights_gb)

    def to_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "resolution": self.resolution,
                "budget_gb": self.budget_gb, "weights_gb": self.weights_gb, "peak_gb": round(self.peak_gb, 2),
                "stages": {k: vars(v) for k, v in self.stages.items()}}

    def format(self) -> str:
        """The printed plan: one line per stage."""
        lines = [f"memory plan: {self.device}, {self.dtype}, {self.resolution} px, budget {self.budget_gb:.1f} GB "
                 f"(plans within {USABLE_FRACTION:.0%}), weights {self.weights_gb:.2f} GB",
                 f"{'stage':<12} {'batch':>6} {'asked':>6} {'GB/row':>8} {'peak GB':>8}  unit"]
        for name, s in self.stages.items():
            lines.append(f"{name:<12} {s.batch:>6} {s.wanted:>6} {s.row_gb:>8.3f} {s.peak_gb:>8.2f}  "
                         f"{STAGE_UNITS.get(name, '')}")
        lines.append(f"estimated peak: {self.peak_gb:.2f} GB")
        return "\n".join(lines)


def row_costs(bundle, dtype: torch.dtype, stages: dict[str, int]) -> dict[str, int]:
    """Bytes per row of each named stage for this bundle's modules (meta-device measurements)."""
    latent, pixels = bundle.sample_size, bundle.pixel_resolution
    costs = {}
    for stage in stages:
        if stage == "generation":
            costs[stage] = 2 * unet_row_bytes(bundle.unet, latent, dtype, "inference")
        elif stage == "unet_loss":
            costs[stage] = unet_row_bytes(bundle.unet, latent, dtype, "inference")
        elif stage in ("attack", "finetune"):
            costs[stage] = unet_row_bytes(bundle.unet, latent, dtype, stage)
        elif stage in ("vae_encode", "vae_decode"):
            costs[stage] = vae_row_bytes(bundle.vae, pixels, latent, bundle.latent_channels, dtype,
                                         decode=stage == "vae_decode")
        else:
            raise ValueError(f"unknown stage {stage}")
    return costs


def plan_memory(bundle, dtype: torch.dtype, budget_bytes: int, stages: dict[str, int],
                device: str = "cpu") -> MemoryPlan:
    """The largest batch per stage (at most what it asks for) whose estimated peak fits the budget;
    a budget too small for one row of some stage is a one-line error naming the smallest that fits."""
    weights = sum(module_bytes(m, dtype) for m in (bundle.unet, bundle.text_encoder, bundle.vae))
    usable = USABLE_FRACTION * budget_bytes - weights
    plan = MemoryPlan(str(device), DTYPE_NAMES[dtype], bundle.pixel_resolution, round(budget_bytes / GB, 2),
                      round(weights / GB, 3))
    costs = row_costs(bundle, dtype, stages)
    for stage, cost in costs.items():
        wanted = max(1, int(stages[stage]))
        batch = min(wanted, int(usable // cost)) if usable > 0 else 0
        if batch < 1:  # name the budget that fits one row of every stage
            need = (weights + max(costs.values())) / USABLE_FRACTION / GB
            raise MemtrainError(
                f"--max_memory {budget_bytes / GB:.1f} GB is too small for one row of stage '{stage}' at "
                f"{bundle.pixel_resolution} px in {DTYPE_NAMES[dtype]} (weights {weights / GB:.2f} GB + "
                f"{cost / GB:.2f} GB a row): the smallest budget that fits is --max_memory {need + 0.05:.1f}GB"
                + ("" if dtype != torch.float32 else ", or use --dtype fp16/bf16"))
        plan.stages[stage] = StagePlan(batch, wanted, round(cost / GB, 4), round((weights + batch * cost) / GB, 2))
    return plan


def meta_bundle(model_dir: str | Path, resolution: int | None = None):
    """A ModelBundle of meta-device modules built from a model folder's configs (no weights read):
    what `--plan` measures. `resolution` overrides the image size (U-Net sample_size)."""
    path = resolve_model_path(model_dir)
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    vae_config = json.loads((path / "vae" / "config.json").read_text())
    vae_cls = codec_class(vae_config.get("_class_name"))
    if vae_cls is None:
        raise MemtrainError(f"model folder '{path}': vae class '{vae_config.get('_class_name')}' is not supported")
    with torch.device("meta"):
        vae = vae_cls.from_config(vae_config)
        unet = UNet2DConditionModel.from_config(unet_config)
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(path / "text_encoder"))
    bundle = ModelBundle(unet, text, None, vae, None, source=str(model_dir), path=str(path))
    if resolution is not None:
        factor = bundle.pixel_resolution // unet.config.sample_size
        if resolution % factor:
            raise MemtrainError(f"--resolution {resolution} must be a multiple of {factor} for this model")
        unet.register_to_config(sample_size=resolution // factor)
    return bundle


def plan_for_run(bundle, runtime, stages: dict[str, int]) -> MemoryPlan:
    """Plan `stages` for a loaded bundle under `runtime`, and make the bundle use it: VAE calls in
    the planned chunks, batch sizes recorded in the runtime (report.json's `runtime`)."""
    plan = plan_memory(bundle, runtime.dtype, runtime.budget_bytes, stages, str(runtime.device))
    bundle.batch_limits = {k: plan.batch(k) for k in ("vae_encode", "vae_decode") if k in plan.stages}
    bundle.runtime = runtime
    runtime.plan = plan.to_dict()
    return plan


def folder_plan(model_dir: str | Path, options, stages: dict[str, int]) -> dict:
    """`--plan` of any command: resolve the runtime options (no model loaded, nothing written),
    plan `stages` from the model folder's configs and return {"plan": dict, "plan_text": str}."""
    runtime = resolve_runtime(options)
    plan = plan_memory(meta_bundle(model_dir), runtime.dtype, runtime.budget_bytes, stages, str(runtime.device))
    return {"plan": plan.to_dict(), "plan_text": plan.format()}
