"""`edited_weights`: another model folder's U-Net in place of the audited one's, undone bit for bit;
per-prompt folders (SISS removes each image in its own model); bad folders refused in one line;
and the audit judging it as a weight edit under `weights`, `embedding` and `prompt`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factories import tiny_bundle
from report_schema import assert_documented
from memtrain.core.bundle import weights_checksum
from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import read_manifest
from memtrain.mitigations import EditedWeights, applied, available_mitigations, get_mitigation
from test_audit import _audit, _config, tiny_testbed  # noqa: F401  (the tiny testbed fixture)

PROMPTS = ["a photo of the astronaut", "a photo of the camera", "a photo of the coffee"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Model folders with other U-Net weights of the tiny shape (seeds 1, 2), one of another shape
    (no cross-attention), one without weights."""
    root = tmp_path_factory.mktemp("edited")
    for name, kw in (("one", {"seed": 1}), ("two", {"seed": 2}), ("other_shape", {"cross_attention": False})):
        tiny_bundle(None, tokenizer=tokenizer, **kw).save(root / name)
    (root / "empty" / "unet").mkdir(parents=True)
    (root / "empty" / "unet" / "config.json").write_text("{}")
    return {name: root / name for name in ("one", "two", "other_shape", "empty")}


def _unet(bundle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bundle.unet.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_puts_the_folders_unet_in_place_and_undo_restores_it_bit_for_bit(tokenizer, folders, dtype):
    bundle = tiny_bundle(None, tokenizer=tokenizer).to(dtype=dtype)
    before, checksum = _unet(bundle), weights_checksum(bundle)
    target = {k: v.to(dtype) for k, v in tiny_bundle(None, tokenizer=tokenizer, seed=1).unet.state_dict().items()}
    m = get_mitigation("edited_weights", model=str(folders["one"]))
    m.prepare(bundle, PROMPTS, [], [0])
    with applied(m, bundle):
        assert _same(_unet(bundle), target)
        assert not _same(_unet(bundle), before)
    assert not m._saved and _same(_unet(bundle), before) and weights_checksum(bundle) == checksum
    # a U-Net folder works as well as the model folder around it
    m = get_mitigation("edited_weights", model=str(folders["one"] / "unet"))
    m.prepare(bundle, PROMPTS, [], [0])
    with applied(m, bundle):
        assert _same(_unet(bundle), target)
    assert weights_checksum(bundle) == checksum


def test_per_prompt_folders_by_prompt_or_item_id(tokenizer, folders, tmp_path):
    from memtrain.core.manifest import ManifestItem, write_manifest

    bundle = tiny_bundle(None, tokenizer=tokenizer)
    before = _unet(bundle)
    manifest = write_manifest(tmp_path / "m.jsonl", [ManifestItem(id=f"item{k}", prompt=p, image="x.png")
                                                     for k, p in enumerate(PROMPTS)])
    unets = {name: tiny_bundle(None, tokenizer=tokenizer, seed=s).unet.state_dict() for name, s in (("one", 1),
                                                                                                   ("two", 2))}
    m = get_mitigation("edited_weights", model=str(folders["one"]), manifest=str(manifest), unmapped="original",
                       per_prompt={PROMPTS[0]: str(folders["one"]), "item1": str(folders["two"])})
    m.prepare(bundle, PROMPTS, [], [0])
    assert m.variant == "a model per prompt"
    for prompt, expected in ((PROMPTS[0], unets["one"]), (PROMPTS[1], unets["two"]), (PROMPTS[2], before)):
        view = m.for_prompts([prompt])
        assert view is not m
        with applied(view, bundle):
            assert _same(_unet(bundle), expected), prompt
        assert _same(_unet(bundle), before)
    with pytest.raises(MemtrainError, match="folders: judge them one at a time"):
        m.for_prompts(PROMPTS[:2])
    strict = get_mitigation("edited_weights", model=str(folders["one"]), per_prompt={PROMPTS[0]: str(folders["one"])})
    strict.prepare(bundle, PROMPTS, [], [0])
    with pytest.raises(MemtrainError, match="no folder for the prompt 'a photo of the camera'.*unmapped: original"):
        strict.for_prompts([PROMPTS[1]])
    # without per-prompt folders the mitigation is the same for every prompt
    plain = get_mitigation("edited_weights", model=str(folders["one"]))
    assert plain.for_prompts([PROMPTS[0]]) is plain and plain.variant == "one model for all prompts"


@pytest.mark.parametrize("settings, message", [
    ({}, "needs mitigation_settings.edited_weights.model"),
    ({"model": "{root}/missing"}, "edited_weights.model: '.*missing' is not a folder"),
    ({"model": "{empty}"}, "edited_weights.model: '.*empty' holds no U-Net weights"),
    ({"model": "{other_shape}"}, "does not match the audited model's .* give a model trained from the audited one"),
    ({"model": "{one}", "per_prompt": {"item0": "{one}"}}, "'item0' is neither a memorized prompt .* need "
                                                           "mitigation_settings.edited_weights.manifest"),
    ({"model": "{one}", "per_prompt": {PROMPTS[0]: "{root}/gone"}}, r"per_prompt.a photo of the astronaut: .*not a folder"),
    ({"model": "{one}", "unmapped": "skip"}, "unmapped must be one of error, original"),
])
def test_bad_settings_and_folders_are_one_line_errors(tokenizer, folders, settings, message):
    bundle = tiny_bundle(None, tokenizer=tokenizer)
    checksum = weights_checksum(bundle)
    names = {"root": folders["one"].parent, **folders}
    text = json.dumps(settings)
    for name, path in names.items():
        text = text.replace("{" + name + "}", str(path))
    with pytest.raises(MemtrainError, match=message) as err:
        m = get_mitigation("edited_weights", **json.loads(text))
        m.prepare(bundle, PROMPTS, [], [0])
    assert "\n" not in str(err.value)
    assert weights_checksum(bundle) == checksum


def test_left_out_of_all_since_it_needs_a_folder():
    assert "edited_weights" not in available_mitigations() and "none" in available_mitigations()
    assert EditedWeights.needs_settings and not EditedWeights.inference_time


def test_the_audit_judges_it_as_a_weight_edit_under_every_threat_model(tiny_testbed, tokenizer, folders, tmp_path):  # noqa: F811
    """Rows under weights, embedding and prompt against the original model's baseline, held-out
    control included, weights restored; per prompt, an unmapped target is judged on the original
    weights (its prompt figures are the unmitigated ones) and a mapped one on its own folder's."""
    out = tmp_path / "audit"
    settings = {"edited_weights": {"model": str(folders["one"])}}
    doc = _audit(_config(tiny_testbed, out, ["none", "edited_weights"], max_targets=2, threat_models=None,
                         mitigation_settings=settings))
    rows = {(r["mitigation"], r["threat_model"]): r for r in doc["results"]}
    assert {t for (m, t) in rows if m == "edited_weights"} == {"weights", "embedding", "prompt"}
    for threat in ("weights", "embedding", "prompt"):
        row = rows[("edited_weights", threat)]
        assert row["weights_restored"] and row["verdict"] != "bypassed"
        assert isinstance(row["mr_control"], float) and isinstance(row["mr_attack"], float)
        assert row["mr_unmitigated"] == rows[("none", "embedding")]["mr_unmitigated"]
    assert rows[("edited_weights", "prompt")]["attack_name"] == "pez"
    assert rows[("edited_weights", "weights")]["attack_name"] == "dori"
    assert rows[("edited_weights", "embedding")]["description"]["settings"]["model"] == str(folders["one"])
    assert_documented("report.json (scripts/audit.py)", json.loads((out / "report.json").read_text()))

    items = read_manifest(tiny_testbed / "manifests" / "memorized.jsonl")[:2]
    per_prompt = {"edited_weights": {"model": str(folders["one"]), "unmapped": "original",
                                     "manifest": str(tiny_testbed / "manifests" / "memorized.jsonl"),
                                     "per_prompt": {items[0].id: str(folders["two"])}}}
    doc = _audit(_config(tiny_testbed, tmp_path / "per_prompt", ["edited_weights"], max_targets=2,
                         mitigation_settings=per_prompt, prune_per_prompt=True))
    row = doc["results"][0]
    assert row["pruning"] == "per prompt" and row["weights_restored"]
    mapped, unmapped = row["per_item"]
    assert unmapped["sscd_orig_prompt"] == unmapped["sscd_orig_unmitigated"]
    assert mapped["sscd_orig_prompt"] != mapped["sscd_orig_unmitigated"]
