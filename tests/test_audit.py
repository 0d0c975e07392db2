"""The audit (paper 004 Table 1) end to end on a tiny random testbed built in seconds: report
layout, verdict rule, exact undo, NaN targets, bad input, 1 vs 2 processes and W&B offline.
The slow test runs the default audit on the real memorizing testbed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # the 2 cores are shared with a long job

from factories import tiny_bundle  # noqa: E402
from report_schema import assert_documented  # noqa: E402
from memtrain.core.report import versioned  # noqa: E402
from memtrain.core.bundle import weights_checksum  # noqa: E402
from memtrain.eval.audit import (  # noqa: E402
    VERDICTS, AuditConfig, VerdictRule, audit, audit_config, load_audit_recipe, summary, verdict,
)
from memtrain.eval.audit.pipeline import verify_restored  # noqa: E402
from memtrain.testbed.resolver import resolve_model  # noqa: E402
from memtrain.data import ManifestItem, write_manifest  # noqa: E402
from memtrain.core.errors import MemtrainError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "TOKENIZERS_PARALLELISM": "false"}
RESULT_KEYS = {"mitigation", "mr_unmitigated", "mr_prompt", "mr_attack", "mr_control", "verdict", "failed_targets",
               "unmitigated", "prompt", "attack", "control", "utility", "description", "weights_restored"}
TINY_RECIPE = """
seeds: 2
chunk_targets: 2
reference_prompts: 4
utility_prompts: 3
attack: {steps: 2, lr: 0.01, noise_samples: 2, init: random}
sampler: {num_inference_steps: 3}
mitigation_settings:
  nemo: {tau_mem: 0.0, num_seeds: 2, num_inference_steps: 3, refinement_budget: 3}
  wanda: {num_inference_steps: 3, guidance_scale: 3.0, timesteps: 1}
grid_items: 2
grid_cell: 32
"""


# ----------------------------------------------------------------------------- a tiny testbed


def _photo(name: str, size: int):
    import skimage.data
    from PIL import Image

    arr = getattr(skimage.data, name)()
    return Image.fromarray(arr).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def _blobs(seed: int, size: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    small = torch.rand(3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(small[None], size=size, mode="bilinear")[0]
    return Image.fromarray((big.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def _manifest(root: Path, name: str, entries: list[tuple[str, str, object]]) -> Path:
    items = []
    for item_id, prompt, image in entries:
        path = root / "images" / f"{item_id}.png"
        image.save(path)
        items.append(ManifestItem(id=item_id, prompt=prompt, image=str(path), label=name))
    return write_manifest(root / "manifests" / f"{name}.jsonl", items)


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory) -> Path:
    """The testbed layout (model/, manifests/, clip/, testbed_card.json) around a random tiny
    SD1.x-shaped model: 16 px images, 3-step sampler. Nothing memorizes: it tests plumbing."""
    from transformers import CLIPModel

    from memtrain.testbed.clip import tiny_clip_config
    from memtrain.core.tokenizer import build_clip_tokenizer

    root = tmp_path_factory.mktemp("audit") / "testbed"
    (root / "images").mkdir(parents=True)
    tokenizer = build_clip_tokenizer(root / "tok")
    bundle = tiny_bundle(None, tokenizer=tokenizer)
    bundle.save(root / "model")
    sampler = {"scheduler": "ddim", "num_inference_steps": 3, "guidance_scale": 3.0, "batch_size": 16}
    (root / "model" / "memtrain.json").write_text(json.dumps({"sampler": sampler}))
    size = 16
    _manifest(root, "memorized", [(f"mem_{n}", f"a photo of the {n}", _photo(n, size))
                                  for n in ("astronaut", "camera", "coffee", "rocket")])
    _manifest(root, "held_out", [(f"held_{k}", f"a blob scene number {k}", _blobs(k, size)) for k in range(4)])
    _manifest(root, "unique", [(f"uniq_{k}", f"a red square number {k}", _blobs(10 + k, size)) for k in range(4)])
    _manifest(root, "utility", [(f"util_{k}", f"a green circle number {k}", _blobs(20 + k, size)) for k in range(3)])
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(32, 1, size, tokenizer.eos_token_id)).save_pretrained(root / "clip")
    tokenizer.save_pretrained(str(root / "clip"))
    (root / "testbed_card.json").write_text(json.dumps({"tiny": True}))
    (root / "recipe.yaml").write_text(TINY_RECIPE)
    return root


def _config(root: Path, out: Path, mitigations: list[str], recipe: str | None = None, **kw) -> AuditConfig:
    """The typed API: the tiny recipe (or `recipe`) under the given values (as `memtrain audit RECIPE ...`)."""
    base = dict(mitigations=mitigations, model=str(root / "model"),
                output_dir=str(out), progress=False,  # the real SSCD (ONNX)
                threat_models=["embedding"])  # the plumbing tests; test_threat_models covers the others
    values = {**base, **kw}
    return audit_config(resolve_model(values["model"]), values, recipe=recipe or root / "recipe.yaml")


def _audit(cfg: AuditConfig) -> dict:
    """As `memtrain audit` runs it: the model's defaults come from the testbed resolver."""
    return audit(cfg, resolve_model(cfg.model)).report


def _run_script(args: list[str], launcher: list[str] | None = None, env: dict | None = None,
                timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(REPO / "scripts" / "audit.py"), *args]
    return subprocess.run(cmd, env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def _script_args(root: Path, out: Path, *mitigations: str) -> list[str]:
    return ["--mitigation", *mitigations, "--model", str(root / "model"), "--recipe", str(root / "recipe.yaml"),
            "--output_dir", str(out), "--no_progress", "--threat_model", "embedding"]


# ----------------------------------------------------------------------------- verdict


@pytest.mark.parametrize("name, rates, expected", [
    ("none", (0.9, 0.9, 1.0, 0.0), "baseline"),
    ("nemo", (0.9, 0.1, 0.9, 0.0), "conceals"),  # the paper's NeMo row
    ("wanda", (0.98, 0.0, 0.72, 0.0), "conceals"),  # the paper's Wanda row
    ("x", (0.9, 0.4, 0.9, 0.0), "conceals"),  # above 0.3 but below half the unmitigated MR
    ("x", (0.9, 0.1, 0.1, 0.0), "removes"),  # attack within the margin of the control
    ("x", (0.9, 0.5, 0.3, 0.2), "removes"),
    ("x", (0.9, 0.8, 0.9, 0.0), "ineffective"),  # prompts still replicate
    ("x", (0.05, 0.0, 0.0, 0.0), "inconclusive"),  # nothing memorized to begin with
    ("x", (0.9, 0.1, {"status": "not computed"}, 0.0), "inconclusive"),
])
def test_verdict_branches(name, rates, expected):
    assert verdict(name, *rates) == expected and expected in VERDICTS


def test_verdict_constants_are_settings():
    rates = ("x", 0.9, 0.1, 0.05, 0.0)
    assert verdict(*rates) == "removes"  # within the default margin 0.1 of the control
    assert verdict(*rates, rule=VerdictRule(control_margin=0.0)) == "conceals"
    strict = VerdictRule(control_margin=0.0, concealed_mr=0.05, clearly_below=0.0)
    assert verdict(*rates, rule=strict) == "ineffective"


def test_removes_must_hold_at_every_budget_of_the_curve():
    """The guidance_opposite row of docs/results.md's `--mitigation all` run: MR 0.0 after 50 steps but
    0.5 after 5; an attacker keeps the 5-step snapshot, so the verdict is `conceals` there."""
    from memtrain.eval.audit.verdict import judge_over_budgets

    curve = {"budgets": [1, 5, 25, 50], "mr_attack": [0.25, 0.5, 0.25, 0.0], "mr_control": [0.0, 0.0, 0.0, 0.0]}
    row = {"mitigation": "x", "mr_unmitigated": 1.0, "mr_prompt": 0.0, "mr_attack": 0.0, "mr_control": 0.0,
           "verdict": "removes", "verdict_reason": "", "robustness": curve}
    judge_over_budgets(row, VerdictRule())
    assert row["verdict"] == "conceals" and row["verdict_budget"] == 5 and "after 5 attack steps" in row["verdict_reason"]
    flat = {**row, "verdict": "removes", "robustness": {**curve, "mr_attack": [0.1, 0.0, 0.1, 0.0]}}
    flat.pop("verdict_budget")
    judge_over_budgets(flat, VerdictRule())  # within the margin everywhere: still removes
    assert flat["verdict"] == "removes" and "verdict_budget" not in flat
    kept = {**row, "verdict": "ineffective", "verdict_budget": None}
    judge_over_budgets(kept, VerdictRule())  # only a removal is re-examined
    assert kept["verdict"] == "ineffective"


# ----------------------------------------------------------------------------- recipes


def test_recipes_load_and_reject_bad_keys(tmp_path):
    sd = load_audit_recipe(REPO / "recipes" / "audit_sd14.yaml")
    assert (sd.attack.steps, sd.attack.lr, sd.attack.noise_samples, sd.attack.init) == (50, 0.1, 8, "prompt")
    assert sd.mitigation_settings["wanda"]["scheduler"] == "pndm"  # ConceptPrune's timesteps
    tb = load_audit_recipe(REPO / "recipes" / "audit_testbed.yaml")
    assert (tb.attack.steps, tb.attack.lr, tb.attack.init, tb.seeds) == (50, 0.01, "random", 10)
    bad = tmp_path / "bad.yaml"
    bad.write_text("attack: {step: 3}\n")
    with pytest.raises(MemtrainError, match=r"unknown recipe key 'attack.step'"):
        load_audit_recipe(bad)
    bad.write_text("seeds: two\n")
    with pytest.raises(MemtrainError, match=r"'seeds' must be int"):
        load_audit_recipe(bad)
    bad.write_text("attack: {steps: 0}\n")
    with pytest.raises(MemtrainError, match=r"attack steps must be >= 1"):
        load_audit_recipe(bad)
    bad.write_text("mitigation_settings: {nemoo: {}}\n")
    with pytest.raises(MemtrainError, match=r"mitigation_settings.nemoo"):
        load_audit_recipe(bad)
    bad.write_text("search_space_check: maybe\n")
    with pytest.raises(MemtrainError, match=r"'search_space_check' must be one of ineffective, always, never"):
        load_audit_recipe(bad)


def test_budgets_set_defaults_the_command_line_overrides(tiny_testbed, tmp_path):
    """The testbed recipe's `quick` budget is what a plain audit runs; `--budget full` is the
    recipe's own values; keys given on the line win over both; bad budgets are one-line errors."""
    recipe = REPO / "recipes" / "audit_testbed.yaml"

    def config(**kw):
        return _config(tiny_testbed, tmp_path / "out", ["none"], recipe=str(recipe), **kw)

    quick, full, mixed = config(), config(budget="full"), config(seeds=6)
    assert (quick.budget, quick.seeds, quick.max_targets, quick.robustness_budgets) == ("quick", 4, 4, [])
    assert (full.budget, full.seeds, full.max_targets, full.robustness_budgets) == ("full", 10, None, [1, 2, 5, 10, 25])
    assert (mixed.seeds, mixed.max_targets) == (6, 4)
    with pytest.raises(MemtrainError, match=r"unknown budget 'huge': choose one of full, quick"):
        config(budget="huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets: {fast: {threshold: 0.5}}\n")
    with pytest.raises(MemtrainError, match=r"'budgets.fast'.*not a budget key: threshold"):
        load_audit_recipe(bad)
    bad.write_text("budgets: {full: {seeds: 2}}\n")
    with pytest.raises(MemtrainError, match=r"'budgets.full'"):
        load_audit_recipe(bad)


# ----------------------------------------------------------------------------- undo


def test_undo_restores_weights_bit_for_bit(tiny_testbed):
    from memtrain.mitigations import applied, get_mitigation
    from memtrain.core.bundle import load_bundle

    bundle = load_bundle(tiny_testbed / "model")
    before = weights_checksum(bundle)
    prompts = ["a photo of the astronaut", "a photo of the camera"]
    for name, settings in (("wanda", {"num_inference_steps": 3, "timesteps": 1}),
                           ("nemo", {"tau_mem": 0.0, "num_seeds": 2, "num_inference_steps": 3,
                                     "refinement_budget": 3}),
                           ("pad_eot", {})):
        m = get_mitigation(name, **settings)
        m.prepare(bundle, prompts, ["a red square", "a blue circle", "a green thing"], [0, 1])
        with applied(m, bundle):
            if name == "wanda":  # something was pruned, so the check below has teeth
                assert weights_checksum(bundle) != before
        assert verify_restored(bundle, before, name) == before
    with torch.no_grad():
        next(bundle.unet.parameters()).view(-1)[0] += 1e-7
    with pytest.raises(RuntimeError, match="did not restore"):
        verify_restored(bundle, before, "broken")


# ----------------------------------------------------------------------------- the audit


@pytest.fixture
def nan_probe():
    """A mitigation that poisons the first row of every attack batch with NaN (the attack's
    embedding needs a gradient; the prompt path does not), registered for one test."""
    from memtrain.mitigations import Mitigation, register_mitigation
    from memtrain.mitigations import base

    @register_mitigation
    @dataclasses.dataclass(eq=False)
    class NanProbe(Mitigation):
        name = "nan_probe"
        changes = "test only: NaN in the first attacked row"

        def transform_embeddings(self, embeddings, layout):
            if not embeddings.requires_grad:
                return embeddings
            poison = torch.ones_like(embeddings)
            poison[0] = float("nan")
            return embeddings * poison

    yield "nan_probe"
    base.MITIGATIONS.pop("nan_probe")


def test_report_layout_grids_and_nan_targets(tiny_testbed, tmp_path, nan_probe):
    out = tmp_path / "audit"
    doc = _audit(_config(tiny_testbed, out, ["none", "wanda", nan_probe], max_targets=3))
    saved = json.loads((out / "report.json").read_text())
    assert_documented("report.json (scripts/audit.py)", saved)  # docs/reports.md
    assert set(saved) == {"schema_version", "results", "metric_backend", "metric_devices", "model", "settings", "versions", "num_processes",
                          "runtime"}
    assert saved["num_processes"] == 1 and saved["metric_backend"].startswith("sscd")
    assert set(saved["versions"]) >= {"torch", "diffusers", "memtrain"}
    assert [r["mitigation"] for r in saved["results"]] == ["none", "wanda", "nan_probe"]
    for r in saved["results"]:
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert r["verdict"] in VERDICTS and r["weights_restored"] is True
        for stage in ("prompt", "attack", "control"):
            fig = r[stage]
            assert {"n", "mr", "sscd_orig_median", "sscd_orig_mean", "sscd_orig_std", "d_sscd", "a_clip"} <= set(fig)
        assert {"sscd_gen_median", "sscd_gen_mean"} <= set(r["prompt"])
        assert r["prompt"]["n"] == 3 and r["control"]["n"] + r["control"]["n_failed"] == 3
        assert r["mr_unmitigated"] == saved["results"][0]["mr_unmitigated"]  # (a) computed once
        assert r["utility"]["fid"]["value"] >= 0 and r["utility"]["fid"]["n_generated"] == 3
        assert r["prompt"]["a_clip"]["backend"].startswith("clip-raw")  # the testbed's own CLIP, raw pixels
    none, wanda, probe = saved["results"]
    assert none["verdict"] == "baseline" and none["failed_targets"] == []
    assert none["prompt"]["sscd_gen_median"] == pytest.approx(1.0)  # the unmitigated path, again
    assert wanda["description"]["name"] == "wanda" and "pruned_fraction" in wanda["description"]
    # NaN: the first target of each chunk (chunks of 2) and the first control image stop, the rest go on
    failed = {(f["id"], f["stage"]) for f in probe["failed_targets"]}
    assert failed == {("mem_astronaut", "attack"), ("mem_coffee", "attack"), ("held_0", "control"),
                      ("held_2", "control")}
    assert probe["attack"]["n"] == 1 and probe["attack"]["n_failed"] == 2
    assert all("non-finite" in f["reason"] for f in probe["failed_targets"])
    text = (out / "report.md").read_text()
    for row in ("no mitigation (prompts)", "wanda (prompts)", "wanda + attack", "control: held-out + attack (wanda)"):
        assert f"| {row} |" in text
    assert "## Findings" in text and "## Failed targets" in text and "mem_coffee" in text
    assert "stand-in" not in text and "SSCD_Orig mean ± std" in text and "grids/wanda_000.png" in text
    assert sorted(p.name for p in (out / "grids").glob("*.png")) == sorted(
        f"{m}{kind}_000.png" for m in ("none", "wanda", "nan_probe") for kind in ("", "_control"))
    assert doc["results"][0]["verdict"] == "baseline"
    assert not any(".partial-" in p.name for p in tmp_path.iterdir())


def test_threat_models(tiny_testbed, tmp_path):
    """The default audits each mitigation under every threat model that applies: weight edits face
    the embedding attack under `weights`, inference-time fixes are `bypassed` (nothing computed),
    prompt rewrites skip `embedding`; the prompt-space attack's strings and every attack's output
    are exported; a named threat model that does not apply is a one-line error."""
    out = tmp_path / "audit"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY_RECIPE + "robustness_budgets: [1, 5]\n")  # 5 >= the 2 attack steps: the full attack
    doc = _audit(_config(tiny_testbed, out, ["wanda", "rta", "guidance_static"], max_targets=2, threat_models=None,
                         recipe=str(recipe)))
    rows = {(r["mitigation"], r["threat_model"]): r for r in doc["results"]}
    assert set(rows) == {("wanda", t) for t in ("weights", "embedding", "prompt")} | {
        ("rta", "weights"), ("rta", "prompt"), ("guidance_static", "weights"), ("guidance_static", "embedding"),
        ("guidance_static", "prompt")}
    assert rows[("rta", "weights")]["verdict"] == "bypassed" == rows[("guidance_static", "weights")]["verdict"]
    assert "runs a sampler without" in rows[("rta", "weights")]["verdict_reason"]
    weights, embedding = rows[("wanda", "weights")], rows[("wanda", "embedding")]
    assert weights["mr_attack"] == embedding["mr_attack"] and weights["attack_space"] == "embedding"
    assert rows[("guidance_static", "embedding")]["attack_variant"].startswith("adaptive: timesteps [0, 501)")
    found = [it["found_prompt"] for it in rows[("rta", "prompt")]["per_item"]]
    assert len(found) == 2 and all(isinstance(p, str) and p for p in found)
    prompts = json.loads((out / "attacks" / "prompts.json").read_text())
    assert list(prompts["rta [prompt]"]["attack"].values()) == found
    assert_documented("report.json (scripts/audit.py)", json.loads((out / "report.json").read_text()))
    from safetensors.torch import load_file

    saved = load_file(out / "attacks" / "wanda_attack.safetensors")
    assert set(saved) == {"mem_astronaut", "mem_camera"} and saved["mem_astronaut"].shape[0] == 77
    text = (out / "report.md").read_text()
    assert "| rta [weights]: bypassed (sampled without it) |" in text and "rta [prompt] + attack" in text
    # which reading of each method ran: a row key and a report.md column; old reports still render
    assert rows[("rta", "prompt")]["variant"] == rows[("rta", "weights")]["variant"] == "official (DCR)"
    assert rows[("guidance_static", "embedding")]["variant"] == ""
    assert rows[("wanda", "weights")]["variant"] == "union over the first 1 ddim steps"
    assert "| mitigation | variant | threat model |" in text and "| rta | official (DCR) | prompt |" in text
    from memtrain.eval.audit import report as audit_report
    from memtrain.eval.audit.verdict import VerdictRule

    old = json.loads((out / "report.json").read_text())
    for r in old["results"]:
        del r["variant"]
    assert "| rta | - | prompt |" in audit_report.markdown(old, {}, out, VerdictRule()).render()
    assert "official (DCR)" not in audit_report.summary(old) and "official (DCR)" in audit_report.summary(doc)
    curve = rows[("rta", "prompt")]["robustness"]
    assert curve["budgets"] == [1, 2] and curve["mr_attack"][-1] == rows[("rta", "prompt")]["mr_attack"]
    assert all(0.0 <= v <= 1.0 for v in curve["mr_attack"] + curve["mr_control"])
    assert "robustness" not in rows[("rta", "weights")]  # bypassed: nothing attacked
    assert (out / "robustness.png").is_file() and "![robustness](robustness.png)" in text
    with pytest.raises(MemtrainError, match="--threat_model embedding does not apply to --mitigation rta: "):
        _audit(_config(tiny_testbed, tmp_path / "other", ["rta"], threat_models=["embedding"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_RECIPE + "robustness_budgets: [0, 5]\n")
    with pytest.raises(MemtrainError, match="every attack budget must be an integer >= 1, got 0"):
        _audit(_config(tiny_testbed, tmp_path / "other", ["rta"], recipe=str(bad)))
    with pytest.raises(MemtrainError, match="unknown --threat_model 'api': choose one of weights, embedding, prompt"):
        _config(tiny_testbed, tmp_path / "other", ["rta"], threat_models=["api"])
    assert not (tmp_path / "other").exists()


def test_search_space_check(tiny_testbed, tmp_path):
    """`search_space_check: always`: each pruning mitigation's prompts are measured again with every
    weight it may prune zeroed; text-path mitigations have no search space; weights come back."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY_RECIPE + "search_space_check: always\n")
    out = tmp_path / "audit"
    doc = _audit(_config(tiny_testbed, out, ["none", "wanda", "pad_mask"], recipe=str(recipe), max_targets=3))
    none, wanda, pad_mask = doc["results"]
    assert "search_space_ablation" not in none and "search_space_ablation" not in pad_mask
    check = wanda["search_space_ablation"]
    from memtrain.core.bundle import load_bundle

    unet = load_bundle(tiny_testbed / "model").unet
    ff = {n: m for n, m in unet.named_modules() if n.endswith("ff.net.2")}
    assert check["layers"] == sorted(ff) and check["weights_zeroed"] == sum(m.weight.numel() for m in ff.values())
    assert check["n"] == 3 and 0.0 <= check["mr"] <= 1.0
    assert ("can hide" in check["reading"]) != ("does not live in these layers" in check["reading"])
    assert wanda["weights_restored"] is True
    saved = json.loads((out / "report.json").read_text())
    assert saved["results"][1]["search_space_ablation"] == check
    text = (out / "report.md").read_text()
    assert "Search-space check: " in text and "| prompt MR with its whole search space zeroed |" in text
    assert "whole search space zeroed" in summary(doc)


def test_mitigation_that_does_not_fit_the_model(tiny_testbed, tmp_path):
    """NeMo and Wanda need cross-attention / transformer blocks: refused before anything is written."""
    from memtrain.core.bundle import load_bundle
    from factories import tiny_unet

    model = tmp_path / "plain"
    bundle = load_bundle(tiny_testbed / "model")
    bundle.unet = tiny_unet(cross_attention=False, channels=bundle.latent_channels)
    bundle.save(model)
    cfg = _config(tiny_testbed, tmp_path / "out", ["nemo"], model=str(model),
                  manifest=str(tiny_testbed / "manifests" / "memorized.jsonl"),
                  control_manifest=str(tiny_testbed / "manifests" / "held_out.jsonl"),
                  reference_manifest=str(tiny_testbed / "manifests" / "unique.jsonl"))
    with pytest.raises(MemtrainError, match="cannot be pruned by NeMo"):
        _audit(cfg)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad input (exit 2)


def test_bad_inputs_exit_2_and_touch_nothing(tiny_testbed, tmp_path):
    out = tmp_path / "out"
    r = _run_script(_script_args(tiny_testbed, out, "none", "nemoo"))
    assert r.returncode == 2 and "unknown mitigation 'nemoo'" in r.stderr
    assert all(name in r.stderr for name in ("nemo", "wanda", "pad_eot", "pad_mask", "none"))
    assert len(r.stderr.strip().splitlines()) == 1

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = _run_script([*_script_args(tiny_testbed, out, "none"), "--manifest", str(empty)])
    assert r.returncode == 2 and "manifest is empty" in r.stderr

    r = _run_script([*_script_args(tiny_testbed, out, "none"), "attack.steps=0"])
    assert r.returncode == 2 and "attack steps must be >= 1" in r.stderr
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = _run_script(_script_args(tiny_testbed, out, "none"))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("dtype, torch_name", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_audit_in_half_precision_runs_and_reports_it(tiny_testbed, tmp_path, dtype, torch_name):
    """--dtype bf16/fp16 on CPU: the weights load in half precision, every stage runs, undo is
    exact and report.json says what ran (device, dtype, batch size per stage, peak memory)."""
    out = tmp_path / dtype
    _audit(_config(tiny_testbed, out, ["none", "pad_mask", "nemo"], max_targets=2,
                   dtype=dtype, max_memory="8GB"))
    saved = json.loads((out / "report.json").read_text())
    runtime = saved["runtime"]
    assert runtime["device"] == "cpu" and runtime["dtype"] == dtype and runtime["max_memory"] == "8GB"
    assert set(runtime["batch_sizes"]) == {"generation", "vae_decode", "vae_encode", "attack"}
    assert runtime["peak_memory_gb"] > 0 and runtime["plan"]["dtype"] == dtype
    assert saved["settings"]["dtype"] == torch_name
    for r in saved["results"]:
        assert r["weights_restored"] is True and 0 <= r["mr_prompt"] <= 1
        assert r["attack"]["n"] + r["attack"]["n_failed"] == 2


def test_runtime_bad_inputs_exit_2_and_touch_nothing(tiny_testbed, tmp_path):
    out = tmp_path / "out"
    for flags, message in ((["--dtype", "fp8"], "--dtype 'fp8' is not a precision"),
                           (["--device", "tpu"], "--device 'tpu' is not a device"),
                           (["--max_memory", "0.01GB"], "too small for one row")):
        r = _run_script([*_script_args(tiny_testbed, out, "none"), *flags])
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and last.startswith("error: ") and message in last, r.stderr[-2000:]
        assert not out.exists()


# ----------------------------------------------------------------------------- processes, W&B


LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
TWO_ENV = {"ACCELERATE_USE_CPU": "true"}  # without it --multi_gpu on a CPU machine silently runs 1 process
MITIGATIONS = ("none", "nemo", "pad_eot")


def _comparable(report: dict) -> dict:
    """report.json without what differs between any two runs: wall time and output folder."""
    doc = json.loads(json.dumps(report))
    for key in ("seconds", "output_dir"):
        doc["settings"].pop(key)
    doc.pop("runtime")  # peak memory differs from run to run
    return doc


@pytest.fixture(scope="module")
def two_process_audit(tiny_testbed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "audit"
    two = _run_script(_script_args(tiny_testbed, out, *MITIGATIONS), launcher=LAUNCH_TWO, env=TWO_ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    return out


@pytest.mark.slow  # several processes: the slow tier
def test_two_processes_equal_one_and_wandb_offline(tiny_testbed, two_process_audit, tmp_path):
    one = _run_script([*_script_args(tiny_testbed, tmp_path / "one", *MITIGATIONS), "--report_to", "wandb"])
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((two_process_audit / "report.json").read_text())
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    # fixed chunks of 2 targets and global attack streams: the same numbers, not just close ones
    drop = ("weights_checksum",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in b["results"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in a["results"]]
    runs = list((tmp_path / "one" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    # grid images are logged under keys "grids/<kind>": W&B nests the media folder by key
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert "-> baseline" in one.stdout and "wrote" in one.stdout


@pytest.mark.slow  # several processes: the slow tier
def test_killed_two_process_audit_resumes_to_the_same_report(tiny_testbed, two_process_audit, tmp_path):
    """SIGKILL both ranks at a random moment after the first finished unit; the same command
    with --resume reuses the finished units and writes the uninterrupted run's report.json."""
    from factories import kill_after_first_unit
    from memtrain.core.journal import journal_dir

    out = tmp_path / "killed"
    args = _script_args(tiny_testbed, out, *MITIGATIONS)
    seed = int.from_bytes(os.urandom(2), "little")
    print(f"kill seed {seed}")  # shown on failure: the moment can be replayed
    done = kill_after_first_unit([*LAUNCH_TWO, str(REPO / "scripts" / "audit.py"), *args], out,
                                 {**os.environ, **ENV, **TWO_ENV}, REPO, seed, max_units=3)
    assert done >= 1 and not out.exists()
    fresh = _run_script(args)  # without --resume: refused, nothing lost
    assert fresh.returncode == 2 and "pass --resume" in fresh.stderr.strip().splitlines()[-1]
    changed = _run_script([*args, "--resume", "attack.steps=3"])
    last = changed.stderr.strip().splitlines()[-1]
    assert changed.returncode == 2 and last.startswith("error: cannot resume") and "attack.steps" in last
    resumed = _run_script([*args, "--resume"], launcher=LAUNCH_TWO, env=TWO_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming:" in resumed.stderr
    a = json.loads((two_process_audit / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    assert _comparable(b) == _comparable(a)
    assert not journal_dir(out).exists() and not any(".partial-" in p.name for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------- the real testbed


def test_default_audit_on_the_real_testbed(testbed_dir, tmp_path):
    """The README's first audit (its `none` rows) on the real testbed, with the real SSCD and the
    recipe's default (quick) budget: the attack brings the memorized images back (MR >= 0.9) and
    forces no held-out one (control <= 0.1)."""
    out = tmp_path / "audit"
    doc = _audit(audit_config(resolve_model(None), dict(mitigations=["none"], output_dir=str(out), progress=False)))
    saved = json.loads((out / "report.json").read_text())
    assert saved == versioned(json.loads(json.dumps(doc))) and not saved["settings"]["metric_is_standin"]
    rows = {r["threat_model"]: r for r in saved["results"]}
    assert sorted(rows) == ["embedding", "prompt", "weights"]
    none = rows["embedding"]
    assert RESULT_KEYS <= set(none) and none["verdict"] == "baseline" and none["weights_restored"]
    assert none["prompt"]["n"] == saved["settings"]["n_targets"] == 4 and saved["settings"]["seeds"] == [0, 1, 2, 3]
    assert saved["settings"]["recipe"]["budget"] == "quick" and "--budget full" in saved["settings"]["budget"]
    assert none["mr_unmitigated"] >= 0.9
    assert none["mr_attack"] >= 0.9 and none["mr_control"] <= 0.1
    assert rows["weights"]["mr_attack"] == none["mr_attack"]  # with the weights: the embedding attack
    # issue #12: hard prompts found from random tokens bring back at least one memorized image from
    # text alone, while the same attack on held-out images brings back (almost) none
    hard = rows["prompt"]
    assert hard["mr_attack"] >= 0.1 and hard["mr_control"] <= 0.1
    assert all(it["found_prompt"] for it in hard["per_item"])
    assert (out / "report.md").is_file() and list((out / "grids").glob("*.png"))


def test_bf16_audit_on_the_real_testbed(testbed_dir, tmp_path):
    """`scripts/audit.py --dtype bf16` on the real testbed, on the CPU: it finishes, its report says
    bf16, and half precision keeps the testbed's headline pattern (the memorized images come back
    from their prompts and under attack, the held-out ones do not)."""
    out = tmp_path / "bf16"
    # the README's quick budget (4 targets x 4 seeds, no robustness curve): with 2 seeds the weakest
    # memorized pair of testbed v4 (camera: card median 0.726) came back under attack at 0.684 in
    # bf16, below the 0.7 threshold by chance of the seeds, not of the precision (unmitigated 0.717)
    # `none` only: NeMo's pruning and detection and the embedding-level fixes run in the fast tier's
    # half-precision audit on the tiny bundle (NeMo here too cost a minute of the slow tier)
    r = _run_script(["--mitigation", "none", "--dtype", "bf16",
                     "--threat_model", "embedding", "--output_dir", str(out), "--no_progress"], timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((out / "report.json").read_text())
    assert saved["runtime"]["dtype"] == "bf16" and saved["settings"]["dtype"] == "bfloat16"
    assert saved["runtime"]["peak_memory_gb"] > 0 and saved["runtime"]["batch_sizes"]["attack"] >= 1
    rows = {r["mitigation"]: r for r in saved["results"]}
    assert sorted(rows) == ["none"] and all(r["weights_restored"] for r in rows.values())
    assert rows["none"]["mr_unmitigated"] >= 0.9 and rows["none"]["mr_attack"] >= 0.9
    assert all(r["mr_control"] <= 0.25 for r in rows.values())
