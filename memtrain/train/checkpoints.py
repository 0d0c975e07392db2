"""Checkpoint folders of a training run (adversarial fine-tuning, the removal methods): saving one
atomically, which are complete, which one `--resume_from_checkpoint` names, and the per-rank
parameter digest the distributed tests compare."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from memtrain.core.errors import MemtrainError
from memtrain.core.files import replace_dir, sha256_file
from memtrain.core.fingerprint import fingerprint

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
    """Order-stable digest of every parameter: equal on all DDP ranks iff weights agree. Reduced
    on the parameters' device (memtrain.core.fingerprint): no host copy of the weights."""
    params = sorted(module.named_parameters())
    sums = [p.detach().double().sum() for _, p in params]
    total = float(torch.stack(sums).sum()) if sums else 0.0
    return {"sha256": fingerprint(params, digest="sha256"), "sum": total}


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (checkpoint-STEP, no temp folders), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def file_digests(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file under a checkpoint folder (but the state file, which holds them)."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE):
        out[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint whose files no longer match the digests saved in it (a
    truncated copy, a flipped byte, a lost file), or None. Checkpoints saved without digests
    (older runs) are trusted as before."""
    try:
        saved = json.loads((folder / STATE_FILE).read_text()).get("files")
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} unreadable ({e})"
    if saved is None:
        return None
    now = file_digests(folder)
    for name, digest in saved.items():
        if name not in now:
            return f"{name} is missing"
        if now[name]["size"] != digest["size"]:
            return f"{name} has {now[name]['size']} bytes, {digest['size']} were saved"
        if now[name]["sha256"] != digest["sha256"]:
            return f"{name} does not match its saved checksum"
    return None


def resolve_resume(arg: str | None, root: Path) -> Path | None:
    """The checkpoint --resume_from_checkpoint names ('latest' or a path), or None for a fresh run.
    'latest' is the newest intact checkpoint: a damaged newer one is named and skipped."""
    if not arg:
        return None
    if arg == "latest":
        found = checkpoint_dirs(root)
        for path in reversed(found):
            problem = damage(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged (%s): falling back to the previous one", path.name, problem)
        if found:
            raise MemtrainError(f"every checkpoint under {root} is damaged: rerun without --resume_from_checkpoint")
        log.info("no checkpoint under %s: starting a fresh run", root)
        return None
    path = Path(arg)
    if not (path / STATE_FILE).is_file():
        raise MemtrainError(f"--resume_from_checkpoint '{arg}' is not a memtrain checkpoint (no {STATE_FILE})")
    problem = damage(path)
    if problem is not None:
        raise MemtrainError(f"checkpoint {path} is damaged ({problem}): resume from an earlier one or 'latest'")
    return path


def save_checkpoint(acc, root: Path, step: int, state: dict, extra: Callable[[Path], None] | None = None,
                    total_limit: int | None = None) -> Path:
    """accelerate's state (every prepared model and optimizer) into root/checkpoint-STEP, saved
    into a temp folder, then renamed: `latest` is never a half-written checkpoint. `state` (the
    run's position, world size, recipe) goes into STATE_FILE with the digests of every file;
    `extra(folder)`, on every process, adds files of its own. Collective."""
    final, tmp = root / f"checkpoint-{step}", root / f".tmp-checkpoint-{step}"
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if extra is not None:
            extra(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            # resume checks the digests: a damaged copy is skipped
            (tmp / STATE_FILE).write_text(json.dumps({**state, "files": file_digests(tmp)}, indent=1))
            replace_dir(tmp, final)
    except OSError as e:  # disk full, quota, permissions: drop the partial folder, keep the rest
        shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoint_dirs(root)
        raise MemtrainError(
            f"saving checkpoint-{step} failed ({e.strerror or e}); the partial folder was removed and "
            f"'latest' is still {kept[-1].name if kept else 'no checkpoint'}: free space, then rerun with "
            f"--resume_from_checkpoint latest") from e
    if acc.is_main_process:
        prune_checkpoints(root, total_limit)
        log.info("saved %s", final)
    acc.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints (None: all)."""
    found = checkpoint_dirs(root)
    if limit is not None and len(found) > limit:
        for old in found[: len(found) - limit]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(acc, arg: str | None, root: Path, recipe: dict, difference: Callable[[dict, dict], str | None],
                    world_size: int) -> tuple[Path, dict] | None:
    """Load the checkpoint `arg` names ('latest' under `root`, or a path) into accelerate's
    prepared objects: (its folder, its saved state), or None for a fresh run. A checkpoint of
    another recipe (`difference(saved, recipe)` names the key) or world size is a one-line error."""
    path = resolve_resume(arg, root)
    if path is None:
        return None
    state = json.loads((path / STATE_FILE).read_text())
    diff = difference(state["recipe"], recipe)
    if diff:
        raise MemtrainError(f"cannot resume from {path}: the recipe differs at {diff}")
    if state["world_size"] != world_size:
        raise MemtrainError(f"cannot resume from {path}: it ran on {state['world_size']} processes, "
                            f"this run has {world_size}")
    acc.load_state(str(path))
    log.info("resumed from %s (step %d)", path, state["global_step"])
    return path, state


def check_finite(acc, loss: torch.Tensor, step: int, root: Path, where: str = "") -> None:
    """Collective: a non-finite loss on any process stops every one with a one-line error naming
    the optimizer step and the last good checkpoint under `root`."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=acc.device)
    if float(acc.reduce(bad, reduction="sum")) > 0:
        last = checkpoint_dirs(root)
        keep = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was saved yet"
        raise MemtrainError(f"non-finite training loss ({loss.item()}) at optimizer step {step + 1}{where}: "
                            f"stopped without updating; {keep}")
