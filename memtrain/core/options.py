"""The option groups every command shares: model, output and metric.

A command's config is a keyword-only dataclass that inherits the groups it uses and adds its own
fields, so `--model`, `--output_dir` or `--metric` mean the same thing, with the same checks, in
every command and as keys of every recipe. The checks here look at values only; whatever reads
the disk (an output folder that is taken, a manifest that is missing) lives in `check_files`,
which a command calls once the config is valid and before any model loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memtrain.core.cli import chain_post_init, option
from memtrain.core.errors import MemtrainError
from memtrain.core.files import check_output_dir
from memtrain.core.journal import check_fresh_start
from memtrain.core.manifest import read_manifest
from memtrain.core.runtime import RuntimeOptions

REPORT_TO = ("none", "wandb", "tensorboard")


@dataclass(kw_only=True)
class ModelOptions(RuntimeOptions):
    """Which model, where it runs and in what precision."""

    model: str | None = option(None, "a diffusers model folder, a testbed folder (or its model/), a hub id, "
                                     "or testbed (the cached one, built on first use; also the default)")
    lora: str | None = option(None, "U-Net LoRA weights fused into --model first (the model/ folder of a "
                                    "finetune: lora run)")

    @property
    def runtime(self) -> RuntimeOptions:
        """The device / precision / memory settings alone, as memtrain.core.runtime takes them."""
        return RuntimeOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RuntimeOptions)})


@dataclass(kw_only=True)
class OutputOptions:
    """Where results go, whether a previous run may be replaced or continued, and who watches."""

    output_dir: str | None = option(None, "where the results go (default: a new folder named after the model "
                                          "and the time)")
    overwrite: bool = option(False, "replace an existing output dir (once the new one is complete)")
    resume: bool = option(False, "continue the interrupted run in --output_dir from its last finished unit "
                                 "(same command line)")
    report_to: str = option("none", "also log to a tracker: wandb, tensorboard or none")
    project: str | None = option(None, "tracker project name (default: memtrain-<command>)")
    progress: bool = option(True, "progress bars and per-stage summaries")

    def __post_init__(self) -> None:
        if self.report_to is None:
            self.report_to = "none"
        if self.report_to not in REPORT_TO:
            raise MemtrainError(f"--report_to must be one of {', '.join(REPORT_TO)}, got '{self.report_to}'")
        if self.resume and self.output_dir is None:
            raise MemtrainError("--resume needs the --output_dir of the interrupted run")
        chain_post_init(self, OutputOptions)

    @property
    def tracker(self) -> str | None:
        """The tracker to log to, or None."""
        return None if self.report_to == "none" else self.report_to

    def check_output(self, *manifests: str | None) -> None:
        """Read from disk: the output folder is free (or --overwrite/--resume says what to do with
        it), and each manifest named (None: not given) reads."""
        if self.output_dir is not None:
            check_output_dir(self.output_dir, self.overwrite)
            check_fresh_start(self.output_dir, self.resume, self.overwrite)
        for path in manifests:
            if path is not None:
                read_manifest(path)


@dataclass(kw_only=True)
class MetricOptions:
    """The copy descriptor (SSCD) and the optional CLIP weights for alignment."""

    metric: str | None = option(None, "SSCD backend: onnx (default), a TorchScript/.onnx path, or standin")
    allow_standin: bool = option(False, "permit the named stand-in descriptor (tests; never for real figures)")
    clip_model: str | None = option(None, "CLIPModel folder for A_CLIP (default: the model's own CLIP, if any)")


def group_fields(*groups: type) -> set[str]:
    """The field names the given option groups declare."""
    return {f.name for g in groups for f in dataclasses.fields(g)}
