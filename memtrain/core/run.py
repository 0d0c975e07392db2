"""The run scaffold every command uses: the accelerator, experiment trackers, one staged output
folder, and spreading independent work items over accelerate processes.

Pattern: every process takes its deterministic shard (`shard`, or `shard_chunks` for batched
work), works on it, and the picklable
results come back in the original order on every process (`gather_in_order`); only the main
process writes files (`on_main`). Because work items carry their global index, the gathered
result does not depend on how many processes ran, which is what lets 2 processes reproduce
1 process exactly. All functions also accept `accelerator=None` (plain single process).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
from accelerate import Accelerator, InitProcessGroupKwargs, PartialState
from accelerate.utils import ProjectConfiguration, gather_object
from transformers.integrations import unset_hf_deepspeed_config

from memtrain.core.errors import COLLECTIVE_TIMEOUT, MemtrainError
from memtrain.core.files import StagedOutput
from memtrain.core.report import format_value, is_not_computed, scalar_figures, to_jsonable, to_pil

log = logging.getLogger(__name__)

T = TypeVar("T")
# the process-group timeout: long enough for the slowest rank's share of a stage (a shard of an
# SD v1.4 surrogate generation or audit), short enough that a dead peer does not hang a job for hours
DEFAULT_TIMEOUT_MINUTES = 60.0


def world(accelerator=None) -> tuple[int, int]:
    """(process_index, num_processes); (0, 1) without an accelerator."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def is_main(accelerator=None) -> bool:
    """True on the main process (always without an accelerator)."""
    return accelerator is None or accelerator.is_main_process


def is_main_process() -> bool:
    """Main process of the launch (accelerate's state; True when nothing was launched)."""
    return PartialState().is_main_process


def shard_indices(n: int, num_processes: int, process_index: int) -> list[int]:
    """Contiguous, balanced slice of range(n) for one process (sizes differ by at most 1).

    Contiguous rather than strided so that one process's items stay in manifest order, which
    keeps its sampling batches the same as a single-process run over the same items.
    """
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"bad process {process_index} of {num_processes}")
    base, extra = divmod(n, num_processes)
    start = process_index * base + min(process_index, extra)
    stop = start + base + (1 if process_index < extra else 0)
    return list(range(start, stop))


def shard(items: Sequence[T], accelerator=None) -> list[tuple[int, T]]:
    """This process's (global_index, item) pairs."""
    rank, size = world(accelerator)
    return [(i, items[i]) for i in shard_indices(len(items), size, rank)]


def shard_chunks(items: Sequence[T], chunk_size: int, accelerator=None) -> list[list[tuple[int, T]]]:
    """This process's share of fixed global chunks of (global_index, item) pairs.

    The chunks are cut before sharding, so each chunk holds the same items whatever the number
    of processes: batched computations over a chunk (sampling, descriptors) then see the same
    batches, and results agree bit for bit with a single-process run, not just to round-off.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    indexed = list(enumerate(items))
    chunks = [indexed[s : s + chunk_size] for s in range(0, len(indexed), chunk_size)]
    return [chunk for _, chunk in shard(chunks, accelerator)]


def gather_in_order(local: Sequence[tuple[int, Any]], accelerator=None) -> list[Any]:
    """Gather (global_index, result) pairs from all processes; results sorted by index, on
    every process. Results must be picklable (numpy arrays, dicts, ...)."""
    pairs = list(local)
    if accelerator is not None and accelerator.num_processes > 1:
        pairs = gather_object(pairs)  # all_gather_object, flattened: every process gets all
    pairs.sort(key=lambda p: p[0])
    indices = [i for i, _ in pairs]
    if len(set(indices)) != len(indices):
        raise RuntimeError(f"duplicate work indices after gather: {indices}")
    return [r for _, r in pairs]


def gather_list(local: Sequence[Any], accelerator=None) -> list[Any]:
    """Concatenate per-process lists in process order (no reordering)."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(local)
    return gather_object(list(local))


def raise_if_any_failed(error: MemtrainError | None, accelerator=None) -> None:
    """Collective check: if any process hit a user error, every process raises it.

    Without this, one process failing on its shard (an unreadable image, say) would leave the
    others waiting forever in the next gather.
    """
    messages = gather_list([None if error is None else str(error)], accelerator)
    first = next((m for m in messages if m is not None), None)
    if error is not None:
        raise error
    if first is not None:
        raise MemtrainError(first)


def run_checked(fn: Callable[[], T], accelerator=None) -> T:
    """Run fn on every process; a MemtrainError on any of them is raised on all of them."""
    try:
        result, error = fn(), None
    except MemtrainError as err:
        result, error = None, err
    raise_if_any_failed(error, accelerator)
    return result  # type: ignore[return-value]


def wait(accelerator=None) -> None:
    """All processes meet here (no-op without an accelerator)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()


@contextmanager
def on_main(accelerator=None) -> Iterator[bool]:
    """`with on_main(acc) as main: if main: write(...)`; all processes meet afterwards."""
    yield is_main(accelerator)
    wait(accelerator)


# ----------------------------------------------------------------------------- accelerator


def runs_on_cpu() -> bool:
    """True when accelerate will place work on the CPU (no CUDA device, or ACCELERATE_USE_CPU)."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or not torch.cuda.is_available()


def check_cpu_precision(mixed_precision: str | None) -> None:
    """An explicit fp16/bf16 is honoured on the CPU too (slowly: CPU half-precision kernels); fp16
    there is a one-line error naming bf16: accelerate runs no fp16 autocast or loss scaling on the
    CPU, and DeepSpeed's CPU backend lacks fp16 on most CPUs, so the model would train fp32 silently."""
    if mixed_precision not in ("fp16", "bf16") or not runs_on_cpu():
        return
    if mixed_precision == "fp16":
        raise MemtrainError("mixed_precision fp16 is not supported on the CPU (accelerate runs no fp16 autocast "
                            "there): use bf16 (or no)")
    log.info("mixed_precision bf16 on the CPU: honoured, but CPU half-precision kernels are slow")


def make_accelerator(report_to: str | None = None, mixed_precision: str | None = None,
                     gradient_accumulation_steps: int = 1, project_dir: str | os.PathLike = ".",
                     timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Accelerator:
    """The one Accelerator constructor: trackers by name, gloo for several CPU processes, and the
    process-group timeout (`timeout_minutes`, every command's setting).

    CPU DDP and DeepSpeed ZeRO on CPU need the gloo backend named explicitly, or the ranks
    disagree on the world size; a single process must not ask for a process group at all. The
    timeout replaces NCCL's 10-minute default, which kills any rank that waits longer for a peer
    (a collective that times out is reported naming timeout_minutes: memtrain.core.cli.run_main)."""
    log_with = None if report_to in (None, "none") else report_to
    if log_with == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise MemtrainError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    check_cpu_precision(mixed_precision)
    check_timeout(timeout_minutes)
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        group = {"timeout": timedelta(minutes=float(timeout_minutes))}
        if not torch.cuda.is_available():
            group["backend"] = "gloo"
        handlers.append(InitProcessGroupKwargs(**group))
        COLLECTIVE_TIMEOUT["minutes"] = float(timeout_minutes)
        log.info("process-group timeout: %g minutes (timeout_minutes)", float(timeout_minutes))
    project_dir = Path(project_dir)
    accelerator = Accelerator(
        log_with=log_with, mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs")),
        kwargs_handlers=handlers,
    )
    if accelerator.state.deepspeed_plugin is not None:
        # accelerate hands its DeepSpeed config to transformers, whose from_pretrained then builds
        # every model partitioned under ZeRO-3 (the frozen text encoder too, whatever
        # zero3_init_flag says); memtrain prepares only the trained U-Net, so models load whole
        unset_hf_deepspeed_config()
    return accelerator


def check_timeout(minutes: float) -> float:
    """A positive number of minutes, else a one-line error naming timeout_minutes."""
    try:
        value = float(minutes)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        raise MemtrainError(f"timeout_minutes must be a positive number of minutes, got '{minutes}'")
    return value


# ----------------------------------------------------------------------------- trackers


def init_trackers(accelerator, project: str, config: Mapping[str, Any], run_dir: str | os.PathLike) -> None:
    """accelerator.init_trackers with every tracker's files under run_dir (W&B: run_dir/wandb).

    A tracker that cannot start (W&B without a login and without WANDB_MODE=offline) becomes a
    one-line MemtrainError instead of a traceback.
    """
    if not getattr(accelerator, "log_with", None):
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_kwargs = {"wandb": {"dir": str(run_dir)}, "tensorboard": {}}
    flat = {k: v for k, v in to_jsonable(dict(config)).items() if isinstance(v, (str, int, float, bool))}
    try:
        accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)
    except Exception as err:  # wandb raises its own types (UsageError, CommError, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MemtrainError(
            f"could not start experiment tracking ({type(err).__name__}: {first}); for W&B without an "
            "account set WANDB_MODE=offline, or drop --report_to"
        ) from None


def log_to_trackers(accelerator, figures: Mapping[str, Any], images: Mapping[str, Sequence[Any]] | None = None,
                    table: tuple[Sequence[str], Sequence[Sequence[Any]]] | None = None,
                    table_name: str = "items", step: int = 0) -> None:
    """Log scalar figures to every tracker; images (W&B: wandb.Image) and a table to the
    trackers that support them. No-op without trackers or off the main process."""
    trackers = list(getattr(accelerator, "trackers", []) or [])
    if not trackers or not accelerator.is_main_process:
        return
    accelerator.log(scalar_figures(figures), step=step)
    for tracker in trackers:
        if images and hasattr(tracker, "log_images") and tracker.name == "wandb":
            tracker.log_images({k: [to_pil(im) for im in v] for k, v in images.items()}, step=step)
        if table is not None and hasattr(tracker, "log_table"):
            columns, data = table
            clean = [[format_value(v) if is_not_computed(v) or isinstance(v, (list, dict)) else to_jsonable(v)
                      for v in row] for row in data]
            tracker.log_table(table_name, columns=list(columns), data=clean, step=step)


def finish_trackers(accelerator) -> None:
    """Close every tracker (W&B flushes its run folder) without accelerator.end_training(),
    which would also tear down the process group the other processes still use."""
    for tracker in list(getattr(accelerator, "trackers", []) or []):
        tracker.finish()
    if getattr(accelerator, "trackers", None):
        accelerator.trackers = []



# ----------------------------------------------------------------------------- one output folder


class OutputRun:
    """A command that writes one output folder from one or several processes:

        with OutputRun(acc, out, overwrite, "memtrain-audit", config) as run:
            ...                       # every process works
            if run.folder: write(run.folder / "report.json")   # main process only

    The main process writes into a staged hidden folder (trackers' files inside it) that is
    renamed into place when the block ends without error and deleted otherwise, so nothing
    half-written is ever left and a previous output is replaced only by a complete one.
    `trackers=False` when the caller's accelerator already runs its own trackers."""

    def __init__(self, accelerator, output_dir: str | os.PathLike, overwrite: bool, project: str,
                 config: Mapping[str, Any], trackers: bool = True):
        self.accelerator, self.project, self.config, self.trackers = accelerator, project, config, trackers
        self.staged = StagedOutput(output_dir, overwrite) if is_main(accelerator) else None
        self.folder: Path | None = None

    def __enter__(self) -> "OutputRun":
        def start() -> None:
            if self.staged is not None:
                self.folder = self.staged.open()
                if self.trackers:
                    self.accelerator.project_configuration.logging_dir = str(self.folder / "tensorboard")
                    init_trackers(self.accelerator, self.project, self.config, self.folder)

        run_checked(start, self.accelerator)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staged is not None:
            if self.trackers:
                finish_trackers(self.accelerator)  # W&B flushes its run folder before the rename
            if exc_type is None:
                self.staged.commit()
            else:
                self.staged.abort()
        if exc_type is None:
            wait(self.accelerator)
