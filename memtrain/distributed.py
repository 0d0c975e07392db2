"""Small helpers for spreading independent work items over accelerate processes.

Pattern: every process takes its deterministic shard (`shard`, or `shard_chunks` for batched
work), works on it, and the picklable
results come back in the original order on every process (`gather_in_order`); only the main
process writes files (`on_main`). Because work items carry their global index, the gathered
result does not depend on how many processes ran, which is what lets 2 processes reproduce
1 process exactly. All functions also accept `accelerator=None` (plain single process).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

from memtrain.errors import MemtrainError

T = TypeVar("T")


def world(accelerator=None) -> tuple[int, int]:
    """(process_index, num_processes); (0, 1) without an accelerator."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def is_main(accelerator=None) -> bool:
    return accelerator is None or accelerator.is_main_process


def is_main_process() -> bool:
    """Main process of the launch (accelerate's state; True when nothing was launched)."""
    from accelerate import PartialState

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
        from accelerate.utils import gather_object

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
    from accelerate.utils import gather_object

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
    if accelerator is not None:
        accelerator.wait_for_everyone()


@contextmanager
def on_main(accelerator=None) -> Iterator[bool]:
    """`with on_main(acc) as main: if main: write(...)`; all processes meet afterwards."""
    yield is_main(accelerator)
    wait(accelerator)
