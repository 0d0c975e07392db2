"""The removal table (`memtrain removal`, scripts/removal_table.py) on a tiny random testbed: its
JSON rows hold exactly the documented keys and its Markdown the table; items a method skipped are
reported as skipped, never as removed; a budget < 1 is refused in one line; a table where nothing
could run exits non-zero; nothing is overwritten without --overwrite. Trainings run 1-2 steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from report_schema import assert_documented
from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import ManifestItem
from memtrain.eval.audit import VERDICTS
from memtrain.train.removal import RemovalRun
from memtrain.train.removal_report import NOT_RUN, ROW_KEYS, markdown, method_row, not_run_row
from test_audit import tiny_testbed  # noqa: F401  (the tiny testbed fixture)

REPO = Path(__file__).resolve().parents[1]
FAST_SAMPLER = {"num_inference_steps": 2, "guidance_scale": 2.0, "scheduler": "ddim"}


def table_recipe(testbed: Path, out: Path, methods: list[str], **keys) -> Path:
    """A table recipe on the tiny testbed: 2 items, the tiny audit recipe, 1-2 training steps."""
    finetune = out.parent / f"{out.name}-finetune.yaml"
    finetune.write_text(yaml.safe_dump({
        "output_dir": "unused", "seed": 0,
        "train": {"epochs": 1, "updates_per_embedding": 1, "surrogate_batch_size": 2, "learning_rate": 1e-3,
                  "max_steps": 2},
        "attack": {"steps": 2, "noise_samples": 2, "lr": 0.01},
        "surrogates": {"mitigation": "pad_eot", "per_prompt": 1, "sscd_drop_threshold": 0.99, "sampler": FAST_SAMPLER},
        "checkpointing": {"steps": 1, "total_limit": 1},
        "audit": {"epoch_end": False, "closing": False, "kid": False}}))
    recipe = {
        "model": str(testbed / "model"), "output_dir": str(out), "methods": methods, "items": 2, "progress": False,
        "audit_recipe": str(testbed / "recipe.yaml"), "audit": {"search_space_check": "never"},
        "removal": {"descriptor": "standin", "train": {"steps": 2, "learning_rate": 1e-3, "batch": 1},
                    "checkpointing": {"steps": 1, "total_limit": 1}, "esd": {"ddim_steps": 2},
                    "siss": {"generations": 2, "random_tokens": [4], "sampler": FAST_SAMPLER}},
        "finetune_recipe": str(finetune), **keys}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def reset_accelerate() -> None:
    """The table runs in this process: accelerate's singletons from an earlier run must go."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def removal(*argv: str):
    from memtrain.commands import command

    reset_accelerate()
    return command("removal").main([str(a) for a in argv])


@pytest.fixture(scope="module")
def table(tiny_testbed, tmp_path_factory):  # noqa: F811
    """One table of ESD and adversarial fine-tuning on the tiny testbed (2 steps each)."""
    out = tmp_path_factory.mktemp("removal") / "table"
    return removal(table_recipe(tiny_testbed, out, ["esd", "adv_finetune"])), out


def test_the_table_has_a_row_per_method_with_exactly_its_keys(table):
    result, out = table
    doc = json.loads((out / "removal.json").read_text())
    assert doc == json.loads(json.dumps(result.report)) and doc["schema_version"] == 1
    assert [r["method"] for r in doc["rows"]] == ["none", "esd", "adv_finetune"]
    for row in doc["rows"]:
        assert tuple(row) == ROW_KEYS, row
        assert row["verdict"] in VERDICTS and row["skipped"] == {}
        assert all(isinstance(row[k], float) for k in ("mr_prompt", "mr_attack", "mr_control", "sscd_orig_mean"))
        assert isinstance(row["a_clip"], float)  # the tiny testbed brings CLIP weights
    assert doc["rows"][0]["verdict"] == "baseline" and doc["rows"][0]["seconds"]["status"] == "not computed"
    for row in doc["rows"][1:]:
        assert row["seconds"] > 0 and row["peak_memory_gb"] > 0
    assert_documented("removal.json (scripts/removal_table.py)", doc)
    # each method trained into OUT/<method>/model and audited against the original model
    for method in ("esd", "adv_finetune"):
        assert (out / method / "model" / "model_index.json").is_file()
        report = json.loads((out / "audits" / method / "report.json").read_text())
        rows = {r["threat_model"]: r for r in report["results"]}
        assert set(rows) == {"weights", "embedding", "prompt"} and all(r["weights_restored"] for r in rows.values())
        assert rows["embedding"]["description"]["settings"]["model"] == str(out / method / "model")
        assert rows["prompt"]["attack_name"] == "pez" and rows["embedding"]["attack_name"] == "dori"
    assert not (out.parent / ".table.previous").exists()
    text = (out / "removal.md").read_text()
    assert "| method | MR prompt | MR Dori | MR control | SSCD_Orig (Dori) |" in text
    assert "| esd |" in text and "| adv_finetune |" in text and "paper 004 (SD v1.4)" not in text


def test_nothing_is_overwritten_without_overwrite(table, tiny_testbed):  # noqa: F811
    result, out = table
    before = (out / "removal.json").read_bytes()
    recipe = out.parent / "table.yaml"
    with pytest.raises(MemtrainError, match="holds a complete removal table: pass --overwrite"):
        removal(recipe)
    assert (out / "removal.json").read_bytes() == before
    with pytest.raises(MemtrainError, match="holds a complete removal table: pass --overwrite"):
        removal(recipe, "--resume")
    # an interrupted table is neither resumed nor discarded unasked
    again = out.parent / "again"
    again.mkdir()
    (again / "table.json").write_text("{}")
    with pytest.raises(MemtrainError, match="interrupted table's work: pass --resume to continue it, or --overwrite"):
        removal(table_recipe(tiny_testbed, again, ["esd"]))
    with pytest.raises(MemtrainError, match="cannot resume the table .*: .* rerun it as it was"):
        removal(table_recipe(tiny_testbed, again, ["esd"]), "--resume")
    assert (again / "table.json").read_text() == "{}" and (out / "removal.json").read_bytes() == before


def test_a_half_done_table_resumes_per_method(table, tmp_path):
    """A table killed after ESD's row and adversarial fine-tuning's training: --resume reuses ESD's
    row and the training as they are, audits the fine-tuned model again and ends with the same rows."""
    _, out = table
    half = tmp_path / "half"
    shutil.copytree(out, half)
    for done in ("removal.json", "removal.md", "adv_finetune/row.json"):
        (half / done).unlink()
    shutil.rmtree(half / "audits" / "adv_finetune")
    esd_row = (half / "esd" / "row.json").stat().st_mtime_ns
    with pytest.raises(MemtrainError, match="interrupted table's work: pass --resume"):
        removal(out.parent / "table.yaml", f"output_dir={half}")
    result = removal(out.parent / "table.yaml", f"output_dir={half}", "--resume")
    assert (half / "esd" / "row.json").stat().st_mtime_ns == esd_row
    assert (half / "audits" / "adv_finetune" / "report.json").is_file()
    assert result.rows == json.loads((out / "removal.json").read_text())["rows"]


def test_skipped_items_are_reported_as_skipped_never_as_removed(table):
    """A hand-made SISS run that skipped one item: the row lists it, the Markdown names it under
    the skipped items; a method that could not run has every item skipped and verdict 'not run'."""
    _, out = table
    report = json.loads((out / "audits" / "esd" / "report.json").read_text())
    items = [it["id"] for it in report["results"][0]["per_item"]]
    run = RemovalRun(method="siss", model_dirs={items[0]: str(out / "esd" / "model")},
                     skipped={items[1]: "no split: no generation replicates"}, seconds=1.5, peak_memory_gb=0.5)
    row, details = method_row("siss", "edited_weights", {"main": report}, run)
    assert tuple(row) == ROW_KEYS and row["skipped"] == {items[1]: "no split: no generation replicates"}
    assert row["seconds"] == 1.5 and details["model_dirs"] == run.model_dirs
    manifest = [ManifestItem(id=i, prompt=i, image="-") for i in items]
    missing, why = not_run_row("concept_ablation", "every item was skipped (no anchors)", manifest)
    assert tuple(missing) == ROW_KEYS and missing["verdict"] == NOT_RUN
    assert missing["skipped"] == {i: "every item was skipped (no anchors)" for i in items}
    assert missing["mr_attack"]["status"] == "not computed"
    doc = json.loads((out / "removal.json").read_text())
    doc["rows"] += [row, missing]
    doc["methods"].update(siss=details, concept_ablation=why)
    text = markdown(doc, paper="sd14")
    assert "## Skipped items (not removed)" in text
    assert f"- `siss`: `{items[1]}`: no split: no generation replicates" in text
    assert "| not run |" in text and f"`concept_ablation`: `{items[0]}`" in text
    assert "| esd: paper 004 (SD v1.4) | 0.11 | 0.98 |" in text and "0.90 ± 0.04" in text


@pytest.mark.parametrize("override, message", [
    ("removal.train.steps=0", r"removal \(esd\): recipe key 'train.steps' must be .*, got 0"),
    ("audit.seeds=0", "audit: recipe key 'seeds' must be >= 1"),
    ("items=0", "recipe key 'items' must be >= 1"),
    ("methods=[esd, nemo]", "unknown removal method 'nemo'"),
    ("finetune.train.epochs=0", "finetune: recipe key 'train.epochs' must be > 0"),
])
def test_a_budget_below_one_is_refused_in_one_line(tiny_testbed, tmp_path, override, message):  # noqa: F811
    out = tmp_path / "table"
    with pytest.raises(MemtrainError, match=message) as err:
        removal(table_recipe(tiny_testbed, out, ["esd", "adv_finetune"]), override)
    assert "\n" not in str(err.value) and not out.exists()


def test_the_script_exits_non_zero_where_nothing_could_run_and_keeps_the_old_table(tiny_testbed, tmp_path):  # noqa: F811
    """SISS with a replica threshold no generation reaches has no split for any item: nothing could
    run, exit status 2 with one line, and --overwrite left the previous table in place."""
    out = tmp_path / "table"
    out.mkdir()
    (out / "removal.json").write_text("the previous table")
    (out / "table.json").write_text("{}")
    recipe = table_recipe(tiny_testbed, out, ["siss"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "removal_table.py"), str(recipe), "--overwrite",
                           "removal.siss.threshold=1.0"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no removal method could run (siss:" in errors[0], proc.stderr[-2000:]
    assert (out / "removal.json").read_text() == "the previous table"
