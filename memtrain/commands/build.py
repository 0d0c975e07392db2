"""`memtrain build-testbed` and `memtrain build-fixture`: the models memtrain is tried on without
downloading anything.

    memtrain build-testbed [--output_dir OUT] [--seed N] [--data_dir DIR]
    memtrain build-testbed --variant planted [--base TESTBED]
    memtrain build-fixture sd14 OUT [--resolution 256] [--photos DIR]

The testbed: a small text-to-image model trained on CPU until it replicates its duplicated
training images (its card: memorized MR, median SSCD, held-out MR). The fixtures: random weights
with a published Stable Diffusion config (sd14, sd15, sd21-base, sd21), real shapes and memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memtrain.commands.base import Command
from memtrain.core.cli import option
from memtrain.core.command_line import Positional
from memtrain.core.errors import MemtrainError
from memtrain.core.files import check_output_dir
from memtrain.core.report import CommandResult
from memtrain.testbed.build import build_or_reuse, card_summary
from memtrain.testbed.full_size import VARIANTS, build_random_sd
from memtrain.testbed.photos import write_photo_manifests
from memtrain.testbed.planted import planted_variant


@dataclass(kw_only=True)
class BuildTestbedConfig:
    """`memtrain build-testbed`'s config."""

    output_dir: str | None = option(None, "build here (default: the cache, reused when already built)")
    overwrite: bool = option(False, "rebuild over an existing testbed")
    progress: bool = option(True, "progress bars")
    seed: int = option(0, "the testbed's seed (data, training)")
    data_dir: str | None = option(None, "imagefolder with metadata.jsonl (file_name, text, optional duplicate)")
    duplicate_spec: dict | None = option(None, 'duplication by pair id, e.g. {"3": 40} (YAML or JSON)')
    metric: str | None = option(None, "SSCD backend: onnx (default), a TorchScript path, or standin")
    allow_standin: bool = option(False, "permit the named stand-in descriptor")
    device: str = option("cpu", "train and measure here, e.g. cuda (the published card: cpu)")
    variant: Literal["default", "planted"] = option("default", "planted: memorization gated by recorded value "
                                                               "neurons (ground truth for localization)")
    base: str | None = option(None, "--variant planted: the testbed to start from (default: the cached one)")


def build_testbed(cfg: BuildTestbedConfig, line=None) -> CommandResult:
    if cfg.variant == "planted":
        card, out = planted_variant(cfg.base, cfg.output_dir, cfg.seed, cfg.metric, cfg.progress, cfg.overwrite)
        return CommandResult(card, out, message=f"planted testbed at {out}")
    card, message = build_or_reuse(cfg.output_dir, seed=cfg.seed, data_dir=cfg.data_dir,
                                   duplicate_spec=cfg.duplicate_spec, metric=cfg.metric,
                                   allow_standin=cfg.allow_standin, overwrite=cfg.overwrite,
                                   progress=cfg.progress, device=cfg.device)
    return CommandResult(card, None, message=message)


def show_card(result: CommandResult) -> str:
    return f"{result.message}\n{card_summary(result.report)}"


@dataclass(kw_only=True)
class BuildFixtureConfig:
    """`memtrain build-fixture`'s config."""

    variant: str = option(None, f"which published config: {', '.join(sorted(VARIANTS))}")
    output_dir: str = option(None, "the model folder to write")
    overwrite: bool = option(False, "replace an existing folder")
    resolution: int | None = option(None, "default image size (multiple of 64; weights are the published shapes)")
    seed: int = option(0, "the random weights' seed")
    photos: str | None = option(None, "also write LAION-like manifests (memorized.jsonl, held_out.jsonl) here")

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise MemtrainError(f"unknown fixture variant '{self.variant}': choose one of {', '.join(sorted(VARIANTS))}")

    def check_files(self) -> None:
        check_output_dir(self.output_dir, self.overwrite)
        if self.photos:  # refuse a taken folder before minutes of building
            check_output_dir(self.photos, self.overwrite)


def build_fixture(cfg: BuildFixtureConfig, line=None) -> CommandResult:
    out = build_random_sd(cfg.variant, cfg.output_dir, cfg.resolution, cfg.seed, cfg.overwrite)
    photos = write_photo_manifests(cfg.photos, cfg.overwrite) if cfg.photos else None
    return CommandResult({"model": str(out), "photos": str(photos) if photos else None}, out)


def show_fixture(result: CommandResult) -> str:
    lines = [f"wrote {result.report['model']}"]
    if result.report["photos"]:
        lines.append(f"wrote {result.report['photos']} (memorized.jsonl, held_out.jsonl)")
    return "\n".join(lines)


BUILD_TESTBED = Command("build-testbed", __doc__, BuildTestbedConfig, build_testbed, show_card)
BUILD_FIXTURE = Command("build-fixture", __doc__, BuildFixtureConfig, build_fixture, show_fixture,
                        positionals=(Positional("variant", "VARIANT", ", ".join(sorted(VARIANTS))),
                                     Positional("output_dir", "OUTPUT_DIR", "the model folder to write")),
                        skip=("variant",))
