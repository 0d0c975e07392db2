"""A removal method's model audited as a weight edit of the original one (paper 004 Sec. 4.4 and
App. G.2 compare ESD, Concept Ablation, SISS and adversarial fine-tuning under Dori).

`edited_weights` replaces the audited model's U-Net weights by those of another diffusers model
folder (or a U-Net folder) on `apply` and writes the original tensors back on `undo`, bit for bit:
the overwritten tensors are kept, as PruningMitigation keeps the values it zeroes. It acts in the
weights, not at generation time, so the audit judges it like NeMo's pruning: under `weights` and
`embedding` (Dori on the edited weights) and under `prompt`, each against the held-out control.

`per_prompt` (item id or prompt -> folder) serves methods that remove each image in a model of
its own (SISS starts from the original U-Net for every image): with the audit recipe's
`prune_per_prompt: true` each target is judged in its own folder's model (`for_prompts`), while
the held-out control and FID/KID run on `model`. An item the method skipped has no folder:
`unmapped: original` judges it on the original weights (it was not removed), `error` refuses it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import read_manifest
from memtrain.mitigations.base import Mitigation, register_mitigation

WEIGHTS = "diffusion_pytorch_model.safetensors"
UNMAPPED = ("error", "original")
ORIGINAL = ""  # the folder of a prompt judged on the original weights


def unet_folder(folder: str | Path, key: str) -> Path:
    """The U-Net folder inside a diffusers model folder (`unet/`), or the folder itself when it is
    one; anything else is refused in one line naming the setting `key`."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise MemtrainError(f"mitigation_settings.edited_weights.{key}: '{folder}' is not a folder: give a diffusers "
                            "model folder (with unet/) or a U-Net folder")
    for candidate in (path / "unet", path):
        if (candidate / "config.json").is_file() and weight_files(candidate):
            return candidate
    raise MemtrainError(f"mitigation_settings.edited_weights.{key}: '{folder}' holds no U-Net weights "
                        f"(unet/{WEIGHTS} or {WEIGHTS}, or their .index.json shards)")


def weight_files(unet_dir: Path) -> list[Path]:
    """The U-Net's safetensors files: the single file, or the shards its index names."""
    single = unet_dir / WEIGHTS
    if single.is_file():
        return [single]
    index = unet_dir / f"{WEIGHTS}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [unet_dir / shard for shard in shards]
    return []


def stored_shapes(unet_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers (no weights loaded)."""
    shapes = {}
    for path in weight_files(unet_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_shapes(unet_dir: Path, unet, key: str) -> None:
    """The folder's U-Net has exactly the audited U-Net's tensors and shapes, else one line."""
    stored = stored_shapes(unet_dir)
    expected = {name: tuple(t.shape) for name, t in unet.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(n for n in set(expected) & set(stored) if expected[n] != stored[n])
    if missing or extra or wrong:
        first = (f"'{wrong[0]}' is {list(stored[wrong[0]])} there, {list(expected[wrong[0]])} in the audited model"
                 if wrong else f"'{(missing or extra)[0]}' is {'missing' if missing else 'not in the audited model'}")
        raise MemtrainError(f"mitigation_settings.edited_weights.{key}: the U-Net in '{unet_dir}' does not match the "
                            f"audited model's ({len(missing)} missing, {len(extra)} extra, {len(wrong)} of another shape "
                            f"tensors; {first}): give a model trained from the audited one")


@register_mitigation
@dataclasses.dataclass(eq=False)
class EditedWeights(Mitigation):
    """The U-Net weights of another model folder in place of the audited model's."""

    name = "edited_weights"
    changes = "U-Net weights: replaced by those of another model folder (a removal method's output)"
    needs_settings = True  # nothing to apply until `model` names a folder

    model: str = ""  # the folder applied for all prompts (and for the control and FID/KID)
    per_prompt: dict = dataclasses.field(default_factory=dict)  # item id or prompt -> its own folder
    manifest: str = ""  # a JSONL manifest whose ids the per_prompt keys may name
    unmapped: str = "error"  # a target without a per-prompt folder: error, or judged on the original weights
    _folders: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # prompt -> U-Net folder
    _active: str | None = dataclasses.field(default=None, init=False, repr=False)  # what apply loads
    _saved: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # name -> original tensor

    def __post_init__(self) -> None:
        if not self.model:
            raise MemtrainError("mitigation 'edited_weights' needs mitigation_settings.edited_weights.model: the "
                                "model folder whose U-Net replaces the audited one's")
        if self.unmapped not in UNMAPPED:
            raise MemtrainError(f"mitigation_settings.edited_weights.unmapped must be one of {', '.join(UNMAPPED)}, "
                                f"got {self.unmapped!r}")
        self._active = self.model

    @property
    def variant(self) -> str:
        return "a model per prompt" if self.per_prompt else "one model for all prompts"

    # lifecycle ---------------------------------------------------------------------------------
    def prepare(self, bundle, memorized_prompts, reference_prompts, seeds) -> None:
        """Every folder checked against the audited U-Net (headers only), per-prompt keys resolved
        to prompts; a missing folder, a U-Net of another shape or an unknown key is one line."""
        check_shapes(unet_folder(self.model, "model"), bundle.unet, "model")
        by_id = {}
        if self.manifest:
            by_id = {item.id: item.prompt for item in read_manifest(self.manifest)}
        self._folders = {}
        for key, folder in self.per_prompt.items():
            prompt = key if key in memorized_prompts else by_id.get(key)
            if prompt is None:
                hint = "" if self.manifest else " (item ids need mitigation_settings.edited_weights.manifest)"
                raise MemtrainError(f"mitigation_settings.edited_weights.per_prompt: '{key}' is neither a memorized "
                                    f"prompt of this audit nor an item id of the manifest{hint}")
            unet_dir = unet_folder(folder, f"per_prompt.{key}")
            check_shapes(unet_dir, bundle.unet, f"per_prompt.{key}")
            self._folders[prompt] = str(unet_dir)

    def for_prompts(self, prompts: list[str]) -> "EditedWeights":
        """The model of these prompts' own folder (one folder: the audit asks per prompt), not
        applied yet; itself when no per-prompt folders are given."""
        if not self.per_prompt:
            return self
        folders = {self._folder_of(p) for p in prompts}
        if len(folders) != 1:
            raise MemtrainError(f"edited_weights: the prompts {prompts} have {len(folders)} folders: judge them one "
                                "at a time (prune_per_prompt: true)")
        view = copy.copy(self)
        view._saved = {}
        view._active = folders.pop()
        return view

    def _folder_of(self, prompt: str) -> str:
        if prompt in self._folders:
            return self._folders[prompt]
        if self.unmapped == "original":
            return ORIGINAL
        raise MemtrainError(f"mitigation_settings.edited_weights.per_prompt has no folder for the prompt '{prompt}': "
                            "add one, or set unmapped: original to judge it on the original weights")

    @torch.no_grad()
    def apply(self, bundle) -> None:
        if self._saved:
            raise MemtrainError("mitigation 'edited_weights' is already applied: undo it first")
        if self._active == ORIGINAL:  # a target the method did not remove
            return
        unet_dir = unet_folder(self._active, "model")
        current = bundle.unet.state_dict()  # tensors sharing the parameters' storage
        for path in weight_files(unet_dir):
            for name, value in load_file(str(path)).items():
                if name not in current or current[name].shape != value.shape:
                    self.undo(bundle)
                    check_shapes(unet_dir, bundle.unet, "model")  # names the mismatch in one line
                self._saved[name] = current[name].clone()
                current[name].copy_(value)

    @torch.no_grad()
    def undo(self, bundle) -> None:
        current = bundle.unet.state_dict()
        for name, value in self._saved.items():
            current[name].copy_(value)
        self._saved.clear()

    def details(self) -> dict:
        if not self.per_prompt:
            return {}
        return {"per_prompt_folders": len(self.per_prompt),
                "unmapped_prompts": "judged on the original weights" if self.unmapped == "original" else "refused"}
