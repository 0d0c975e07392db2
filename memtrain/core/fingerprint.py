"""Exact fingerprints of model weights computed where the weights live.

A checksum that proves a mitigation's undo is bit-exact (or that DDP ranks agree) used to copy
every tensor to the host and hash its bytes: on a GPU that is the whole model over PCIe, twice
per mitigation. Here each tensor's bits are reduced on its own device to a few int64 sums and
only those come to the host (one copy for all tensors), where they are hashed with the names,
dtypes and shapes.

The reduction: the tensor's bytes as unsigned 16-bit words w_i in [0, 2^16) (bytes for 1-byte
dtypes), cut into rows of 2^15 words; each row is summed as sum_i w_i * c_i with position
weights c_i, a permutation of 1..2^15 (so distinct and nonzero). Every product is < 2^31 (int32)
and a row's sum < 2^46 (int64), so the arithmetic is exact: flipping any one bit changes one
word by +-2^k, hence its row's sum by +-2^k * c_i != 0, so every single-bit change is detected.
Swapping two different words of a row changes its sum too (their weights differ); the rows'
order is kept in the hash. int32 products keep it about as fast as BLAKE2 on a CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

ROW = 1 << 15  # words per row: weights up to 2^15 keep each word * weight below 2^31
SLICE = ROW * 128  # words widened to int32 at a time: bounds the temporary memory (16 MiB)
_WEIGHTS: dict[str, torch.Tensor] = {}


def _position_weights(device: torch.device) -> torch.Tensor:
    """c_i (ROW,) int32 on `device`, made once per device: a permutation of 1..ROW."""
    key = str(device)
    if key not in _WEIGHTS:
        # times an odd number modulo 2^15 is a bijection: distinct weights in a scrambled order
        _WEIGHTS[key] = ((torch.arange(ROW) * 0x2F1B) % ROW + 1).to(device, torch.int32)
    return _WEIGHTS[key]


def _words(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint16/uint8 view (no copy for contiguous tensors)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.uint16)


def row_sums(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's exact fingerprint, int64 (ceil(words / ROW),) on the tensor's device."""
    words = _words(tensor)
    weights = _position_weights(words.device)
    out = []
    for start in range(0, words.numel(), SLICE):
        part = words[start:start + SLICE].to(torch.int32)
        pad = -part.numel() % ROW  # zero words add nothing; the shape in the hash tells lengths apart
        if pad:
            part = torch.cat([part, part.new_zeros(pad)])
        out.append((part.view(-1, ROW) * weights).sum(dim=1, dtype=torch.int64))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=tensor.device)


def fingerprint(named: Iterable[tuple[str, torch.Tensor]], digest: str = "blake2b") -> str:
    """Hex digest over (name, dtype, shape, row sums) of every tensor, in the order given: equal
    iff (but for a hash collision) the tensors are bit-identical. One host copy per device."""
    h = hashlib.blake2b(digest_size=16) if digest == "blake2b" else hashlib.new(digest)
    headers, sums = [], []
    for name, tensor in named:
        sums.append(row_sums(tensor))
        headers.append(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}")
    host: list[torch.Tensor] = [torch.empty(0)] * len(sums)
    by_device: dict[torch.device, list[int]] = {}
    for i, rows in enumerate(sums):
        by_device.setdefault(rows.device, []).append(i)
    for indices in by_device.values():  # the small results only, joined: one copy, one sync
        joined = torch.cat([sums[i] for i in indices]).cpu()
        for i, part in zip(indices, joined.split([sums[i].numel() for i in indices])):
            host[i] = part
    for header, rows in zip(headers, host):
        h.update(header.encode())
        h.update(rows.numpy().tobytes())
    return h.hexdigest()
