"""`memtrain fetch`: download the training images behind a manifest's (or a public release's)
URLs. Writes OUT/images/, OUT/manifest.jsonl and OUT/fetch_report.json. Rerun it to resume:
images already in OUT/images are never fetched again. Exit 0 once every item was tried (dead
links are listed in the report); exit 2 with a one-line error for bad input.

    memtrain fetch sdv1_500_memorized.jsonl --output_dir wen500 --workers 8
"""

from __future__ import annotations

from dataclasses import dataclass

from memtrain.commands.base import Command
from memtrain.core.cli import option
from memtrain.core.command_line import Positional
from memtrain.core.errors import MemtrainError
from memtrain.core.report import CommandResult
from memtrain.data.fetch import fetch_images
from memtrain.data.releases import FORMATS


@dataclass(kw_only=True)
class FetchConfig:
    """`memtrain fetch`'s config."""

    manifest: str | None = option(None, "JSONL manifest, or a release file (see --format)")
    output_dir: str | None = option(None, "folder for images/, the manifest and the report (required)")
    workers: int = option(8, "parallel downloads")
    timeout: float = option(10.0, "seconds per connect/read")
    retries: int = option(3, "retries for transient failures")
    max_bytes: int = option(20_000_000, "largest image accepted")
    backoff: float = option(0.5, "first retry delay (s), doubles")
    insecure: bool = option(False, "accept invalid TLS certificates (many old image hosts)")
    format: str | None = option(None, "input format (default: detected)")
    progress: bool = option(True, "progress bar")

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise MemtrainError("--output_dir is required: the folder the images and the report go to")
        if not self.manifest:
            raise MemtrainError("the MANIFEST to fetch is required")
        if self.format is not None and self.format not in FORMATS:
            raise MemtrainError(f"--format '{self.format}' is not one of {', '.join(FORMATS)}")


def run(cfg: FetchConfig, line=None) -> CommandResult:
    report = fetch_images(cfg.manifest, cfg.output_dir, workers=cfg.workers, timeout=cfg.timeout,
                          retries=cfg.retries, max_bytes=cfg.max_bytes, backoff=cfg.backoff, fmt=cfg.format,
                          verify_tls=not cfg.insecure, progress=cfg.progress)
    return CommandResult(report, cfg.output_dir)


def show(result: CommandResult) -> str:
    r = result.report
    return (f"fetched {r['fetched']} of {r['total']} ({r['skipped_existing']} already present), "
            f"{len(r['dead'])} dead; manifest {r['manifest']}")


COMMAND = Command("fetch", __doc__, FetchConfig, run, show, recipe="none", skip=("manifest",),
                  positionals=(Positional("manifest", "MANIFEST", "a JSONL manifest or a release file"),))
