"""Build the testbed: data -> tiny CLIP -> SD-shaped U-Net -> diffusers folder -> card.

Everything is deterministic from the seed and is written to a temporary sibling folder that
is renamed into place only when the build succeeded, so a failed or killed build never leaves
a half testbed that later commands would reuse.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memtrain.core.manifest import ManifestItem, read_manifest, write_manifest
from memtrain.core.errors import MemtrainError
from memtrain.core.files import replace_dir
from memtrain.core.report import versioned
from memtrain.metrics import get_descriptor
from memtrain.core.sampling import SAMPLER_FILE, SamplerSettings
from memtrain.eval.measure import measure
from memtrain.core.bundle import ModelBundle, load_bundle
from memtrain.testbed.clip import text_tower, train_tiny_clip
from memtrain.testbed.codec import PixelShuffleCodec
from memtrain.testbed.data import Pair, apply_duplicate_spec, synthetic_pairs, user_pairs
from memtrain.core.tokenizer import build_clip_tokenizer
from memtrain.testbed.train_unet import TrainConfig, UNetConfig, build_unet, testbed_scheduler, train_unet
from memtrain.core.text import encode_prompts

logger = logging.getLogger(__name__)
TESTBED_VERSION = "4"
SPLITS = ("memorized", "unique", "held_out", "utility")


@dataclass
class TestbedConfig:
    """Everything a testbed build depends on besides its seed and images."""

    resolution: int = 32
    # 4x4 pixel blocks -> an 8x8 latent with 48 channels: a 9M-parameter U-Net trains at about
    # 0.18 s/step on 2 cores here (a 16x16 latent cost 2-3x more per step for blurrier copies).
    latent_size: int = 8
    memorized_duplicates: int = 100
    n_unique: int = 400
    n_held_out: int = 20
    n_utility: int = 200
    clip_hidden: int = 128
    clip_layers: int = 3
    clip_steps: int = 300
    # Codec: pixel blocks rotated onto their principal components and scaled by variance^-power/2
    # (0 = raw pixels). 0.5 measured best: raw blocks left the tiny U-Net's copies grainy.
    whiten_power: float = 0.5
    # Widths (96, 192), testbed v4: 0.18 s/step against 0.29 for v3's (128, 256), which builds in
    # about 9 instead of 16 minutes with the card's memorized MR still 1.00 (median SSCD 0.86 vs
    # 0.88; docs/measurements.md), and makes every later attack, audit and fine-tuning ~40% cheaper.
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(block_out_channels=(96, 192)))
    # Measured (4 seeds, docs/measurements.md): batch 16 beat 32 and 8 per second of CPU; the
    # memorized median SSCD rose 0.29 / 0.58 / 0.75 / 0.81 at 400 / 800 / 1600 / 2400 steps.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2400, batch_size=16, lr=1e-3))
    # DDPM (ancestral): its fresh noise each step washes out the tiny U-Net's residual errors,
    # which deterministic DDIM keeps as grain. Measured on the built testbed (4 seeds): memorized
    # median SSCD 0.80 with DDIM 20 steps, 0.88 with DDPM 30-50 steps; guidance 2 beat 1 and 3-4.
    sampler: SamplerSettings = field(
        default_factory=lambda: SamplerSettings(scheduler="ddpm", num_inference_steps=30, guidance_scale=2.0)
    )
    card_seeds: int = 10
    card_unique: int = 10


def default_cache_dir() -> Path:
    """MEMTRAIN_CACHE, else ~/.cache/memtrain."""
    root = os.environ.get("MEMTRAIN_CACHE") or Path.home() / ".cache" / "memtrain"
    return Path(root).expanduser()


def default_testbed_dir(seed: int = 0) -> Path:
    """The cached testbed's folder for a seed (versioned)."""
    return default_cache_dir() / f"testbed-v{TESTBED_VERSION}-seed{seed}"


def is_built(path: Path) -> bool:
    """True if `path` holds a complete testbed (its card and model)."""
    return (Path(path) / "testbed_card.json").is_file() and (Path(path) / "model" / "model_index.json").is_file()


def ensure_testbed(seed: int = 0, progress: bool = True) -> Path:
    """The cached testbed folder, built first if it is not there (used when no --model is given)."""
    path = default_testbed_dir(seed)
    if not is_built(path):
        build_testbed(path, seed=seed, progress=progress)
    return path


def build_or_reuse(output_dir: str | Path | None, seed: int = 0, data_dir: str | Path | None = None,
                   overwrite: bool = False, **build_args) -> tuple[dict, str]:
    """(card, what happened): the cached testbed is reused when it is already built and nothing
    asks for another; otherwise build_testbed(output_dir or the cache, ...)."""
    out = Path(output_dir) if output_dir else default_testbed_dir(seed)
    if output_dir is None and data_dir is None and not overwrite and is_built(out):
        return json.loads((out / "testbed_card.json").read_text()), f"testbed already built at {out} (cached)"
    card = build_testbed(out, seed=seed, data_dir=data_dir, overwrite=overwrite, **build_args)
    return card, f"testbed built at {out}"


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def _write_data(out: Path, pairs: list[Pair]) -> None:
    (out / "images").mkdir(parents=True)
    (out / "manifests").mkdir()
    for split in SPLITS:
        items = []
        for p in (p for p in pairs if p.label == split):
            path = out / "images" / f"{p.id}.png"
            p.image.save(path)
            items.append(ManifestItem(id=p.id, prompt=p.prompt, image=str(path), label=split, source="testbed"))
        write_manifest(out / "manifests" / f"{split}.jsonl", items)


def _grid(rows: list[tuple[Image.Image, torch.Tensor]], scale: int = 2) -> Image.Image:
    """Each row: training image | generations (S, 3, H, W)."""
    h, w = rows[0][1].shape[-2:]
    cols = 1 + rows[0][1].shape[0]
    grid = Image.new("RGB", (cols * w, len(rows) * h), "white")
    for r, (train, gens) in enumerate(rows):
        grid.paste(train.convert("RGB").resize((w, h)), (0, r * h))
        for c, g in enumerate(gens):
            arr = (g.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            grid.paste(Image.fromarray(arr), ((c + 1) * w, r * h))
    return grid.resize((cols * w * scale, len(rows) * h * scale), Image.Resampling.NEAREST)


def testbed_card(model_dir: Path, root: Path, cfg: TestbedConfig, descriptor, progress: bool = True,
                 device: str = "cpu"):
    """Measure memorization on the memorized, unique and held-out splits (10 seeds each)."""
    bundle = load_bundle(model_dir, device=device)
    settings = bundle.sampler_settings
    seeds = list(range(cfg.card_seeds))
    card, grid_rows = {}, []
    for split, limit in (("memorized", None), ("unique", cfg.card_unique), ("held_out", None)):
        items = read_manifest(root / "manifests" / f"{split}.jsonl", require_images=True)[:limit]
        images = [Image.open(it.image).convert("RGB") for it in items]
        m = measure(bundle, [it.prompt for it in items], seeds, descriptor, settings, train_images=images, progress=progress)
        fig = m.figures()
        card[split] = {k: fig[k] for k in ("n", "mr", "median_sscd", "d_sscd")}
        card[split]["per_item"] = m.per_item([it.id for it in items])
        grid_rows += [(images[k], m.images[k, :4]) for k in range(min(4, len(items)))]
    return card, _grid(grid_rows)


def build_testbed(
    output_dir: str | Path,
    seed: int = 0,
    data_dir: str | Path | None = None,
    duplicate_spec: dict[str, int] | None = None,
    config: TestbedConfig | None = None,
    metric: str | None = None,
    allow_standin: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Build a memorizing testbed into output_dir; returns its card.

    device trains the U-Net and measures the card there (the tiny CLIP stays on the CPU); the
    default CPU build is the reproducible one the README's figures come from.
    """
    cfg = config or TestbedConfig()
    out = Path(output_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MemtrainError(f"output dir '{out}' exists and is not empty: choose another or pass --overwrite")
    descriptor = get_descriptor(metric, allow_standin=allow_standin)  # fail before hours of work
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MemtrainError(f"device '{device}' asked for but torch sees no CUDA GPU: use --device cpu")
    start = time.time()
    torch.manual_seed(seed)
    if data_dir is not None:
        pairs = user_pairs(data_dir, seed, cfg.resolution)
    else:
        pairs = synthetic_pairs(seed, cfg.resolution, cfg.n_unique, cfg.n_held_out, cfg.n_utility)
        for p in pairs:
            if p.label == "memorized":
                p.duplicate = cfg.memorized_duplicates
    if duplicate_spec:
        apply_duplicate_spec(pairs, duplicate_spec)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_data(tmp, pairs)
        train_pairs = [p for p in pairs if p.label in ("memorized", "unique")]
        images = _to_tensor([p.image for p in train_pairs])
        tokenizer = build_clip_tokenizer(tmp / "model" / "tokenizer")
        clip = train_tiny_clip(
            images, [p.prompt for p in train_pairs], tokenizer, cfg.clip_hidden, cfg.clip_layers,
            cfg.clip_steps, 64, 1e-3, seed, progress=progress,
        )
        clip.save_pretrained(tmp / "clip", safe_serialization=True)
        tokenizer.save_pretrained(str(tmp / "clip"))
        codec = PixelShuffleCodec(factor=cfg.resolution // cfg.latent_size)
        if cfg.whiten_power:
            codec.fit_whitening(images, power=cfg.whiten_power)
        unet = build_unet(cfg.unet, codec.latent_channels, cfg.latent_size, cfg.clip_hidden, seed)
        bundle = ModelBundle(unet, text_tower(clip), tokenizer, codec, testbed_scheduler())
        latents = codec.encode_images(images)
        text = encode_prompts(bundle, [p.prompt for p in train_pairs]).embeddings
        uncond = encode_prompts(bundle, [""]).embeddings[0]
        index = torch.cat([torch.full((p.duplicate,), k) for k, p in enumerate(train_pairs)])
        ema = train_unet(unet.to(device), bundle.scheduler, latents, text, uncond, index, cfg.train, seed, progress=progress)
        bundle.unet = ema.to("cpu")
        bundle.save(tmp / "model")
        (tmp / "model" / SAMPLER_FILE).write_text(json.dumps({"sampler": cfg.sampler.to_dict()}, indent=2))
        train_seconds = time.time() - start
        card, grid = testbed_card(tmp / "model", tmp, cfg, descriptor, progress=progress, device=device)
        grid.save(tmp / "grid.png")
        card = {
            "metric_backend": descriptor.name,
            "build_seconds": round(time.time() - start, 1),
            "train_seconds": round(train_seconds, 1),
            "seed": seed,
            "device": str(device),
            "sampler": cfg.sampler.to_dict(),
            "seeds_per_input": cfg.card_seeds,
            **card,
            "config": asdict(cfg),
            "data_dir": str(data_dir) if data_dir else None,
        }
        (tmp / "testbed_card.json").write_text(json.dumps(versioned(card), indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def card_summary(card: dict) -> str:
    """The testbed card in a few terminal lines."""
    lines = [f"testbed card (metric: {card['metric_backend']}, build {card['build_seconds']:.0f} s, seed {card['seed']})"]
    for split in ("memorized", "unique", "held_out"):
        c = card[split]
        lines.append(f"  {split:9s} n={c['n']:3d}  MR={c['mr']:.2f}  median SSCD={c['median_sscd']:.3f}  D_SSCD={c['d_sscd']:.3f}")
    return "\n".join(lines)
