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

from memtrain.core.cli import option
from memtrain.core.errors import MemtrainError
from memtrain.core.files import check_output_dir
from memtrain.core.journal import check_fresh_start
from memtrain.core.run import DEFAULT_TIMEOUT_MINUTES, check_timeout
from memtrain.core.runtime import RuntimeOptions, parse_device, parse_dtype, parse_memory

REPORT_TO = ("none", "wandb", "tensorboard")


def _chain(instance, cls) -> None:
    """Run the next __post_init__ in the MRO after `cls`'s (the groups combine cooperatively)."""
    parent = getattr(super(cls, instance), "__post_init__", None)
    if parent is not None:
        parent()


@dataclass(kw_only=True)
class ModelOptions:
    """Which model, where it runs and in what precision."""

    model: str | None = option(None, "a diffusers model folder, a testbed folder (or its model/), a hub id, "
                                     "or testbed (the cached one, built on first use; also the default)")
    lora: str | None = option(None, "U-Net LoRA weights fused into --model first (the model/ folder of a "
                                    "finetune: lora run)")
    device: str | None = option(None, "where models run: cpu, cuda, cuda:N (default: the accelerator's; under "
                                      "accelerate launch each process its own)")
    dtype: str = option("auto", "weights' precision: auto (bf16 on CUDA devices that support it, else fp16; "
                                "fp32 on CPU), fp32, fp16 or bf16 (honoured on CPU too)")
    max_memory: str = option("auto", "memory budget the batch sizes are planned for: auto (the device's free "
                                     "memory; CPU: available RAM) or a size like 24GB")
    plan: bool = option(False, "print each stage's batch size and estimated peak memory for this model, "
                               "resolution, dtype and budget, then exit without running")
    timeout_minutes: float = option(DEFAULT_TIMEOUT_MINUTES, "how long a process waits for the others in a "
                                    "collective before the run stops (several processes only)")

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        parse_device(self.device)
        parse_memory(self.max_memory)
        self.timeout_minutes = check_timeout(self.timeout_minutes)
        _chain(self, ModelOptions)

    @property
    def runtime(self) -> RuntimeOptions:
        """The device / precision / memory settings as memtrain.core.runtime takes them."""
        return RuntimeOptions(device=self.device, dtype=self.dtype, max_memory=self.max_memory, plan=self.plan,
                              timeout_minutes=self.timeout_minutes)


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
        _chain(self, OutputOptions)

    @property
    def tracker(self) -> str | None:
        """The tracker to log to, or None."""
        return None if self.report_to == "none" else self.report_to

    def check_output(self) -> None:
        """The output folder is free (or --overwrite/--resume says what to do with it): read from disk."""
        if self.output_dir is not None:
            check_output_dir(self.output_dir, self.overwrite)
            check_fresh_start(self.output_dir, self.resume, self.overwrite)


@dataclass(kw_only=True)
class MetricOptions:
    """The copy descriptor (SSCD) and the optional CLIP weights for alignment."""

    metric: str | None = option(None, "SSCD backend: onnx (default), a TorchScript/.onnx path, or standin")
    allow_standin: bool = option(False, "permit the named stand-in descriptor (tests; never for real figures)")
    clip_model: str | None = option(None, "CLIPModel folder for A_CLIP (default: the model's own CLIP, if any)")


def group_fields(*groups: type) -> set[str]:
    """The field names the given option groups declare."""
    return {f.name for g in groups for f in dataclasses.fields(g)}
