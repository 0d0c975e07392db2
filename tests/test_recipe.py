"""Recipes: unknown/misspelled keys, wrong types and overrides are one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrain.core.errors import MemtrainError
from memtrain.train.recipe import first_difference, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
BASE = {"model": "m", "memorized_manifest": "mem.jsonl", "output_dir": "out", "utility": {"path": "u.jsonl"}}


def build(extra: dict | None = None, overrides: list[str] | None = None):
    return recipe_from_dict({**BASE, **(extra or {})}, overrides)


def test_defaults_follow_the_paper():
    r = build()
    assert r.train.epochs == 5 and r.train.updates_per_embedding == 3
    assert r.attack.steps == 50 and r.attack.init == "alternate"
    assert r.train.utility_batch == r.train.surrogate_batch_size
    assert r.surrogates.mitigation == "nemo" and r.surrogates.sscd_drop_threshold == 0.5


@pytest.mark.parametrize("extra, key", [
    ({"epochs": 3}, "'epochs'"),
    ({"train": {"learning_rat": 1e-4}}, "'train.learning_rat'"),
    ({"train": {"lora": {"rnk": 4}}}, "'train.lora.rnk'"),
])
def test_unknown_key_is_named(extra, key):
    with pytest.raises(MemtrainError, match=key):
        build(extra)


def test_misspelling_gets_a_suggestion():
    with pytest.raises(MemtrainError, match="did you mean 'learning_rate'"):
        build({"train": {"learning_rat": 1e-4}})


@pytest.mark.parametrize("extra, key", [
    ({"train": {"epochs": "five"}}, "train.epochs"),
    ({"train": {"epochs": 2.5}}, "train.epochs"),
    ({"train": {"gradient_checkpointing": "yes"}}, "train.gradient_checkpointing"),
    ({"train": {"learning_rate": True}}, "train.learning_rate"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision"),
    ({"train": {"lora": {"targets": "to_q"}}}, "train.lora.targets"),
    ({"attack": 5}, "attack"),
    ({"seed": None}, "seed"),
])
def test_wrong_type_is_named(extra, key):
    with pytest.raises(MemtrainError, match=key.replace(".", r"\.")):
        build(extra)


def test_missing_required_key():
    with pytest.raises(MemtrainError, match="'output_dir'"):
        recipe_from_dict({"model": "m", "memorized_manifest": "x", "utility": {"path": "u"}})


def test_value_checks():
    with pytest.raises(MemtrainError, match="train.epochs"):
        build({"train": {"epochs": 0}})
    with pytest.raises(MemtrainError, match="surrogates.model"):
        build({"surrogates": {"source": "model"}})


def test_int_is_accepted_for_float():
    assert build({"train": {"learning_rate": 1}}).train.learning_rate == 1.0


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 (PyYAML) reads `1e-3` as a string; users type it that way on the command line
    assert build(overrides=["train.learning_rate=1e-3"]).train.learning_rate == 1e-3
    with pytest.raises(MemtrainError, match="train.learning_rate"):
        build(overrides=["train.learning_rate=fast"])


def test_overrides_dotted_and_typed():
    r = build(overrides=["train.epochs=2", "train.lora.targets=[to_q, to_v]", "attack.l2_radius=null",
                         "surrogates.mitigation=pad_eot", "train.ema.use=true"])
    assert r.train.epochs == 2 and r.train.lora.targets == ["to_q", "to_v"]
    assert r.attack.l2_radius is None and r.surrogates.mitigation == "pad_eot" and r.train.ema.use is True


@pytest.mark.parametrize("override, message", [
    ("train.epochs", "key=value"),
    ("train.epoch=2", "'train.epoch'"),
    ("train.epochs=two", "train.epochs"),
    ("train..epochs=2", "empty key part"),
    ("seed.x=1", "'seed' must be int"),
    ("model.x=1", "'model' is not a section"),
])
def test_bad_overrides(override, message):
    with pytest.raises(MemtrainError, match=message):
        build(overrides=[override])


@pytest.mark.parametrize("name", ["sd14.yaml", "testbed.yaml"])
def test_shipped_recipes_load(name):
    r = load_recipe(REPO / "recipes" / name)
    assert r.train.updates_per_embedding == 3 and r.attack.init == "alternate"


def test_sd14_is_the_papers_setting():
    r = load_recipe(REPO / "recipes" / "sd14.yaml")
    assert (r.train.epochs, r.attack.steps, r.attack.lr, r.train.finetune) == (5, 50, 0.1, "full")
    assert r.surrogates.mitigation == "nemo" and r.train.utility_batch == r.train.surrogate_batch_size


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(MemtrainError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(MemtrainError, match="not valid YAML"):
        load_recipe(bad)


def test_first_difference_ignores_resume_free_keys():
    a, b = build().to_dict(), build({"output_dir": "elsewhere", "audit": {"seeds": 9}}).to_dict()
    assert first_difference(a, b) is None
    c = build({"train": {"learning_rate": 2e-5}}).to_dict()
    assert first_difference(a, c).startswith("train.learning_rate")


def test_testbed_model_fills_its_manifests(tmp_path):
    from memtrain.testbed.resolver import resolve_recipe

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    (tmp_path / "testbed_card.json").write_text("{}")
    (tmp_path / "manifests").mkdir()
    for role in ("memorized", "held_out", "unique", "utility"):
        (tmp_path / "manifests" / f"{role}.jsonl").write_text("")
    recipe = recipe_from_dict({"output_dir": "out"})
    assert recipe.model == "testbed" and recipe.memorized_manifest is None
    filled, defaults = resolve_recipe(recipe_from_dict({"output_dir": "out", "model": str(tmp_path)}))
    assert filled.model == str(tmp_path / "model") == defaults.model_dir
    assert filled.memorized_manifest == str(tmp_path / "manifests" / "memorized.jsonl")
    assert filled.utility.path == str(tmp_path / "manifests" / "utility.jsonl")
    assert filled.audit.heldout_manifest == str(tmp_path / "manifests" / "held_out.jsonl")
    assert defaults.manifest("unique") == str(tmp_path / "manifests" / "unique.jsonl")
    # another model needs its own manifests
    with pytest.raises(MemtrainError, match="'memorized_manifest' is required"):
        resolve_recipe(recipe_from_dict({"output_dir": "out", "model": "example-org/sd-model", "utility": {"path": "u"}}))
