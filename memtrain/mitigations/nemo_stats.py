"""NeMo's per-neuron activation statistics files (Hintersdorf et al. 2024, "Finding NeMo").

Two formats are read, told apart by their first bytes:

* memtrain's cache: safetensors with `mean.<layer>` / `std.<layer>` per value layer (any scope);
* NeMo's published file (1_compute_activations_statistics.py writes it, e.g.
  statistics_additional_laion_prompts_v1_4.pt): a `torch.save` zip of the tuple
  (mean_list, std_list), two lists of one-dimensional float tensors in the order of NeMo's 7
  value layers (down_blocks.0-2.attentions.0-1, then mid_block.attentions.0, each
  .transformer_blocks.0.attn2.to_v) - the data-flow order of memtrain's `down_mid` layers.
  It is read with `weights_only=True` (no code runs) and checked: 7 tensors per list, the
  widths the model's layers have, finite values, std > 0 (the z-score divides by it).

`save_statistics` writes the published format when the name ends in .pt / .pth, else safetensors.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memtrain.core.errors import MemtrainError

OFFICIAL_SUFFIXES = (".pt", ".pth")


def save_statistics(path: Path, mean: dict, std: dict) -> None:
    """Write per-neuron statistics atomically (a killed run leaves none): NeMo's published
    tuple format for a .pt/.pth name, memtrain's safetensors otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    if path.suffix in OFFICIAL_SUFFIXES:
        torch.save(([t.float().contiguous().cpu() for t in mean.values()],
                    [t.float().contiguous().cpu() for t in std.values()]), tmp)
    else:
        tensors = {f"mean.{n}": t.float().contiguous().cpu() for n, t in mean.items()}
        tensors.update({f"std.{n}": t.float().contiguous().cpu() for n, t in std.items()})
        save_file(tensors, str(tmp))
    tmp.replace(path)


def load_statistics(path: Path, layers: dict) -> tuple[dict, dict]:
    """Per-layer (mean, std) for the model's value `layers` (name -> Linear, in order), from
    memtrain's safetensors cache or NeMo's published torch.save file."""
    if zipfile.is_zipfile(path):
        return _load_official(path, layers)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # not safetensors, truncated
        raise MemtrainError(f"nemo statistics '{path}' cannot be read ({type(err).__name__}): "
                            "delete it to recompute from reference prompts") from None
    mean, std = {}, {}
    for name, layer in layers.items():
        m, s = tensors.get(f"mean.{name}"), tensors.get(f"std.{name}")
        if m is None or s is None or m.shape != (layer.out_features,) or s.shape != m.shape:
            raise MemtrainError(f"nemo statistics '{path}' do not fit this model (layer {name}, "
                                f"{layer.out_features} neurons): compute them for this model from reference prompts")
        mean[name], std[name] = m, s
    return mean, std


def _load_official(path: Path, layers: dict) -> tuple[dict, dict]:
    def refuse(what: str) -> MemtrainError:
        return MemtrainError(f"nemo statistics '{path}' (NeMo's torch.save format): {what}")

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, or holds objects weights_only refuses
        raise refuse(f"cannot be read ({type(err).__name__})") from None
    if not isinstance(loaded, tuple) or len(loaded) != 2:
        raise refuse(f"expected a tuple (mean_list, std_list), found {type(loaded).__name__}"
                     + (f" of {len(loaded)}" if isinstance(loaded, (tuple, list)) else ""))
    widths = [layer.out_features for layer in layers.values()]
    lists = {}
    for label, values in zip(("mean", "std"), loaded):
        if not isinstance(values, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in values):
            raise refuse(f"the {label} list is not a list of tensors")
        if len(values) != len(widths):
            raise refuse(f"{len(values)} {label} tensors where this model has {len(widths)} NeMo value layers")
        for index, (tensor, width) in enumerate(zip(values, widths)):
            if tensor.dim() != 1 or tensor.numel() != width or not tensor.is_floating_point():
                raise refuse(f"{label}[{index}] has shape {tuple(tensor.shape)} ({tensor.dtype}), "
                             f"the model's layer {index} has {width} neurons")
            if not bool(torch.isfinite(tensor).all()):
                raise refuse(f"{label}[{index}] has non-finite values")
            if label == "std" and not bool((tensor > 0).all()):
                raise refuse(f"std[{index}] has values <= 0 (the z-score divides by std)")
        lists[label] = [t.float() for t in values]
    names = list(layers)
    return dict(zip(names, lists["mean"])), dict(zip(names, lists["std"]))
