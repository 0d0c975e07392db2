"""Checkpoint folders of a fine-tuning run: which are complete, which one `--resume_from_checkpoint`
names, and the per-rank parameter digest the distributed tests compare."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from memtrain.core.errors import MemtrainError

log = logging.getLogger(__name__)
STATE_FILE = "memtrain_state.json"  # written last into a checkpoint: its presence means complete


@dataclass
class Position:
    """The next micro-step to run: epoch, step group (image slot), update within the image."""

    epoch: int = 0
    group: int = 0
    update: int = 0

    def advance(self, groups: int, updates: int) -> "Position":
        e, g, u = self.epoch, self.group, self.update + 1
        if u == updates:
            g, u = g + 1, 0
        if g == groups:
            e, g = e + 1, 0
        return Position(e, g, u)


def param_checksum(module: torch.nn.Module) -> dict:
    """Order-stable digest of every parameter: equal on all DDP ranks iff weights agree."""
    h = hashlib.sha256()
    total = 0.0
    for name, p in sorted(module.named_parameters()):
        data = p.detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(data.numpy().tobytes())
        total += float(data.double().sum())
    return {"sha256": h.hexdigest(), "sum": total}


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (checkpoint-STEP, no temp folders), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def resolve_resume(arg: str | None, root: Path) -> Path | None:
    """The checkpoint --resume_from_checkpoint names ('latest' or a path), or None for a fresh run."""
    if not arg:
        return None
    if arg == "latest":
        found = checkpoint_dirs(root)
        if not found:
            log.info("no checkpoint under %s: starting a fresh run", root)
            return None
        return found[-1]
    path = Path(arg)
    if not (path / STATE_FILE).is_file():
        raise MemtrainError(f"--resume_from_checkpoint '{arg}' is not a memtrain checkpoint (no {STATE_FILE})")
    return path
