"""The one way commands reach the testbed: turn what the user named (nothing, a testbed folder,
a model folder, a recipe's `model: testbed`) into a model folder and its ModelDefaults.

Everything below this layer asks a ModelDefaults for manifests, CLIP weights and an audit recipe
and never checks whether a model is a testbed; this module is the only one that knows.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from memtrain.core.bundle import ModelDefaults
from memtrain.core.config import packaged_recipe
from memtrain.core.errors import MemtrainError
from memtrain.core.files import exclusive_lock
from memtrain.train.recipe import TESTBED, Recipe, check_resolved
from memtrain.testbed.build import default_testbed_dir, ensure_testbed
from memtrain.testbed.reference import REFERENCE_KEY, ensure_reference_model

TESTBED_AUDIT_RECIPE = "audit_testbed.yaml"  # packaged with memtrain (memtrain/recipes/)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hub spells repository ids
ROLES = ("memorized", "held_out", "unique", "utility")
CACHED_LABEL = "testbed (cached)"


def testbed_root_of(path: str | Path) -> Path | None:
    """The testbed folder `path` is (or whose model/ folder it is), if any; any other subfolder of
    a testbed is not one."""
    path = Path(path).expanduser().absolute()
    for root in (path, path.parent) if path.name == "model" else (path,):
        if (root / "testbed_card.json").is_file() and (root / "model" / "model_index.json").is_file():
            return root
    return None


def testbed_defaults(root: Path, label: str | None = None) -> ModelDefaults:
    """A built testbed's model, its splits as manifests by role, its CLIP and its audit recipe."""
    manifests = {role: str(root / "manifests" / f"{role}.jsonl") for role in ROLES
                 if (root / "manifests" / f"{role}.jsonl").is_file()}
    clip = root / "clip"
    return ModelDefaults(model_dir=str(root / "model"), manifests=manifests,
                         clip_model=str(clip) if clip.is_dir() else None,
                         audit_recipe=str(packaged_recipe(TESTBED_AUDIT_RECIPE)), label=label or root.name)


def cached_testbed(seed: int = 0, progress: bool = True) -> Path:
    """The cached testbed, built once even when several processes ask at the same time."""
    with exclusive_lock(default_testbed_dir(seed).with_suffix(".lock")):
        return ensure_testbed(seed=seed, progress=progress)


def resolve_model(model: str | None, progress: bool = True) -> ModelDefaults:
    """--model as commands take it: None or "testbed" -> the cached testbed (built on first use);
    a testbed folder or its model/ -> that testbed; a diffusers model folder or a hub id as is.
    Anything else (a file, a missing path, another folder) is refused in one line."""
    if model is None or model == TESTBED:
        return testbed_defaults(cached_testbed(progress=progress), CACHED_LABEL)
    path = Path(model).expanduser()
    expected = ("give a diffusers model folder (with model_index.json), a testbed folder or its model/ "
                "folder, a hub id such as CompVis/stable-diffusion-v1-4, or testbed")
    if path.exists():
        root = testbed_root_of(path)
        if root is not None:
            return testbed_defaults(root)
        if path.is_dir() and (path / "model_index.json").is_file():
            return ModelDefaults.plain(model)
        kind = "a file" if path.is_file() else "a folder without model_index.json"
        raise MemtrainError(f"--model '{model}' is {kind}: {expected}")
    owner = Path(str(model).split("/")[0])
    if HUB_ID.match(str(model)) and not str(model).startswith((".", "/", "~")) and not owner.is_dir():
        return ModelDefaults.plain(model)
    raise MemtrainError(f"--model '{model}' does not exist: {expected}")


def resolve_recipe(recipe: Recipe, progress: bool = True) -> tuple[Recipe, ModelDefaults]:
    """A fine-tuning recipe with `model: testbed` pointing at the cached testbed (its splits fill
    the manifests the recipe leaves empty) and `surrogates.model: testbed_reference` at the
    testbed's model trained without the memorized pairs (trained on first use)."""
    defaults = resolve_model(None if recipe.model == TESTBED else recipe.model, progress)
    root = testbed_root_of(defaults.model_dir)
    if root is not None:
        m = defaults.manifests
        utility = recipe.utility
        if not utility.path:
            utility = dataclasses.replace(utility, format="manifest", path=m["utility"])
        audit = recipe.audit
        if not audit.heldout_manifest:
            audit = dataclasses.replace(audit, heldout_manifest=m["held_out"])
        recipe = dataclasses.replace(recipe, model=defaults.model_dir, utility=utility, audit=audit,
                                     memorized_manifest=recipe.memorized_manifest or m["memorized"])
    check_resolved(recipe)  # a model of the user's own needs its manifests named
    spec = recipe.surrogates
    if spec.source == "model" and spec.model == REFERENCE_KEY:
        recipe = dataclasses.replace(recipe, surrogates=dataclasses.replace(spec, model=reference_model(root, progress)))
    return recipe, defaults


def reference_model(root: Path | None, progress: bool = True, key: str = "surrogates.model") -> str:
    """`testbed_reference` as a folder: the testbed's model trained without its memorized pairs
    (trained on first use, once even when several processes ask); `root`: the testbed (None: the
    model is not one, refused naming the recipe `key`)."""
    if root is None:
        raise MemtrainError(f"{key} '{REFERENCE_KEY}' needs a testbed model (model: testbed); "
                            f"for another model give {key} a model folder that never saw the images")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with exclusive_lock(root / ".reference.lock"):
        return str(ensure_reference_model(root, device=device, progress=progress))
