"""Where and how a command runs: one device / precision / memory setting shared by every command.

`RuntimeOptions` is the option group every command carries (`--device`, `--dtype`,
`--max_memory`, `--plan`); `resolve_runtime` turns it into a `Runtime` once the accelerator
exists (each `accelerate launch` process gets its own accelerator device). The Runtime holds
the memory budget the batch sizes are planned from (memtrain.core.memory), records the batch
size each stage actually used, and reports what ran under report.json's `runtime` key.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import psutil
import torch

from memtrain.core.cli import chain_post_init, option
from memtrain.core.errors import MemtrainError
from memtrain.core.run import DEFAULT_TIMEOUT_MINUTES, check_timeout

log = logging.getLogger(__name__)

T = TypeVar("T")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)
_UNITS = {"gib": 2**30, "gb": 1e9, "g": 1e9, "mib": 2**20, "mb": 1e6, "m": 1e6, None: 1e9}


def parse_memory(text: str) -> int | None:
    """'24GB' / '24GiB' / '512MB' / '24' (GB) -> bytes; 'auto' -> None; anything else an error."""
    if str(text).strip().lower() == "auto":
        return None
    match = _MEMORY.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise MemtrainError(f"--max_memory '{text}' is not a memory size: use auto or a size like 24GB, 40GB, 512MB")
    unit = match.group(2).lower() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


def parse_dtype(name: str) -> str:
    """A checked dtype name: auto, fp32, fp16 or bf16 (float32/float16/bfloat16 accepted)."""
    aliases = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "no": "fp32"}
    key = aliases.get(str(name).lower(), str(name).lower())
    if key != "auto" and key not in DTYPES:
        raise MemtrainError(f"--dtype '{name}' is not a precision: use auto, fp32, fp16 or bf16")
    return key


def parse_device(name: str | None) -> torch.device | None:
    """A checked torch device name (cpu, cuda, cuda:1, ...) or None for the accelerator's."""
    if name is None or str(name).lower() == "auto":
        return None
    try:
        return torch.device(str(name))
    except (RuntimeError, ValueError):
        raise MemtrainError(f"--device '{name}' is not a device: use cpu, cuda or cuda:N "
                            "(default: the accelerator's)") from None


@dataclass(kw_only=True)
class RuntimeOptions:
    """Where and how models run: device, precision, memory budget (checked without I/O)."""

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
        chain_post_init(self, RuntimeOptions)


@dataclass
class Runtime:
    """What a command runs on: device, dtype, memory budget; the batch sizes it used and its peak."""

    device: torch.device
    dtype: torch.dtype
    budget_bytes: int
    budget_source: str = "auto"
    batch_sizes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plan: dict | None = None  # the memory plan the batch sizes came from (memtrain.core.memory)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def record(self, stage: str, batch: int) -> int:
        """Note a batch a stage ran; the report keeps each stage's largest (the one that sets its
        memory; a halved chunk is recorded as the halved size, since only finished chunks count)."""
        previous = self.batch_sizes.get(stage)
        self.batch_sizes[stage] = int(batch) if previous is None else max(previous, int(batch))
        return int(batch)

    def peak_memory_gb(self) -> float:
        """The process's peak: CUDA's max allocated bytes on a GPU, the peak resident set on CPU."""
        return round(peak_memory_bytes(self.device) / 1e9, 3)

    def to_dict(self) -> dict:
        """report.json's `runtime`."""
        return {"device": str(self.device), "dtype": self.dtype_name, "batch_sizes": dict(self.batch_sizes),
                "peak_memory_gb": self.peak_memory_gb(), "max_memory_gb": round(self.budget_bytes / 1e9, 2),
                "max_memory": self.budget_source, "notes": list(self.notes), "plan": self.plan}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on `device` (CUDA: max allocated; CPU: peak RSS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on the device now: CUDA's free bytes; on CPU the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def resolve_device(requested: torch.device | None, accelerator=None, planning: bool = False) -> torch.device:
    """The device to run on; a CUDA device that does not exist is a one-line error (except when
    only planning for it: `--plan --device cuda --max_memory 80GB` on a machine without one)."""
    default = accelerator.device if accelerator is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if requested is None:
        return torch.device(default)
    if requested.type == "cuda" and planning and not torch.cuda.is_available():
        return requested
    if requested.type == "cuda":
        if not torch.cuda.is_available():
            raise MemtrainError(f"--device {requested}: no CUDA device is visible here; use --device cpu "
                                "(or leave --device out)")
        if requested.index is None:  # plain "cuda": each accelerate process its own GPU
            return torch.device(default) if torch.device(default).type == "cuda" else torch.device("cuda", 0)
        if requested.index >= torch.cuda.device_count():
            raise MemtrainError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) "
                                f"visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return requested


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on a CUDA device that supports it, else fp16; fp32 off CUDA. An explicit
    name is honoured on any device (half precision runs on CPU too, slowly); bf16 on a CUDA
    device without bf16 is an error naming fp16."""
    key = parse_dtype(name)
    if device.type == "cuda" and not torch.cuda.is_available():  # planning for an absent GPU
        return torch.float16 if key == "auto" else DTYPES[key]
    if key == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MemtrainError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                            "use --dtype fp16 (or auto)")
    return DTYPES[key]


def resolve_runtime(options: RuntimeOptions | None = None, accelerator=None) -> Runtime:
    """The Runtime for these options on this process; TF32 on for CUDA, peak statistics reset."""
    options = options or RuntimeOptions()
    device = resolve_device(parse_device(options.device), accelerator, planning=options.plan)
    dtype = resolve_dtype(options.dtype, device)
    budget = parse_memory(options.max_memory)
    if device.type == "cuda" and not torch.cuda.is_available():
        if budget is None:
            raise MemtrainError(f"--plan for {device} on a machine without one needs --max_memory (e.g. 80GB)")
        return Runtime(device, dtype, int(budget), options.max_memory)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    source = "auto" if budget is None else options.max_memory
    if budget is None:
        budget = free_memory_bytes(device)
        if device.type == "cpu":  # processes of one launch share the machine's RAM
            budget //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    runtime = Runtime(device, dtype, int(budget), source)
    log.info("running on %s in %s, memory budget %.1f GB (%s)", device, runtime.dtype_name, budget / 1e9, source)
    return runtime


# ----------------------------------------------------------------------------- out of memory


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def release_cached_memory(device: torch.device | str | None = None) -> None:
    """Give cached CUDA blocks back before a retry (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_in_chunks(n: int, batch: int, fn: Callable[[int, int], T], stage: str,
                  runtime: Runtime | None = None) -> list[T]:
    """fn(start, stop) over [0, n) in chunks of `batch`; out of memory halves the chunk and retries
    once, saying so (a second failure is a one-line error naming --max_memory)."""
    batch = max(1, int(batch))
    results: list[T] = []
    start, retried = 0, False
    while start < n:
        stop = min(n, start + batch)
        try:
            results.append(fn(start, stop))
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            release_cached_memory()
            if retried or batch == 1:
                raise MemtrainError(f"out of memory in stage '{stage}' at batch {batch} even after halving: "
                                    "lower --max_memory (or use --dtype fp16/bf16) so smaller batches are "
                                    "planned") from None
            batch, retried = max(1, batch // 2), True
            log.warning("out of memory in stage '%s': retrying with batch %d", stage, batch)
            if runtime is not None:
                runtime.notes.append(f"{stage}: out of memory, batch halved to {batch}")
            continue
        if runtime is not None:
            runtime.record(stage, stop - start)
        start = stop
    return results


def chunk_bounds(n: int, batch: int) -> Sequence[tuple[int, int]]:
    """[(start, stop), ...] covering range(n) in chunks of `batch`."""
    batch = max(1, int(batch))
    return [(s, min(n, s + batch)) for s in range(0, n, batch)]
