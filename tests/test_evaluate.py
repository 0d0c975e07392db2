"""The evaluate command end to end on a tiny testbed built once per session (seconds, not the
real 15-minute one): figures, outputs, W&B offline, 1 vs 2 processes, FID/KID, A_CLIP, bad
input, and the sampling benchmark. The card check on the real testbed is marked slow."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from memtrain.data import read_manifest, write_manifest  # noqa: E402
from memtrain.core.errors import MemtrainError  # noqa: E402
from memtrain.core.sampling import SamplerOverrides  # noqa: E402
from memtrain.eval.evaluate import EvaluateConfig, evaluate as _run_evaluate  # noqa: E402
from memtrain.testbed.resolver import resolve_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("n", "mr", "median_sscd", "sscd_orig_median", "sscd_orig_mean", "sscd_orig_std", "d_sscd")
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline",
                  "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}


def _cfg(dev_testbed: Path, manifest: Path, out: Path, **kw) -> EvaluateConfig:
    base = dict(model=str(dev_testbed / "model"), manifest=str(manifest), seeds=2, output_dir=str(out),
                progress=False)  # the real SSCD (ONNX)
    base.update(kw)
    return EvaluateConfig(**base)


def evaluate(cfg: EvaluateConfig, **kw) -> dict:
    """As scripts/evaluate.py runs it: the model's defaults come from the testbed resolver."""
    return _run_evaluate(cfg, resolve_model(cfg.model), **kw)


def _run_script(args: list[str], launcher: list[str] | None = None, timeout: int = 300,
                env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(REPO / "scripts" / "evaluate.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_partial_dirs(parent: Path) -> bool:
    return not any(".partial-" in p.name for p in parent.iterdir())


# ----------------------------------------------------------------------------- figures


def test_figures_reproduce_the_card(dev_testbed, tmp_path):
    """The done-when check on the dev testbed: its card's seeds, sampler and SSCD backend."""
    card = json.loads((dev_testbed / "testbed_card.json").read_text())
    m = evaluate(EvaluateConfig(model=str(dev_testbed / "model"), seeds=card["seeds_per_input"],
                                output_dir=str(tmp_path / "out"), progress=False))
    assert m["metric_backend"] == card["metric_backend"]
    assert m["n"] == card["memorized"]["n"]
    assert m["mr"] == card["memorized"]["mr"]
    assert m["median_sscd"] == pytest.approx(card["memorized"]["median_sscd"], abs=1e-6)
    assert m["d_sscd"] == pytest.approx(card["memorized"]["d_sscd"], abs=1e-6)
    by_id = {r["id"]: r for r in card["memorized"]["per_item"]}
    for row in m["items"]:
        assert row["sscd_orig_max"] == pytest.approx(by_id[row["id"]]["sscd_orig_max"], abs=1e-6)


@pytest.mark.slow
def test_evaluate_in_bf16_says_so_and_stays_close_to_fp32(dev_testbed, small_manifest, tmp_path):
    """--dtype bf16 on CPU: generation and scoring run in half precision, metrics.json's runtime
    says bf16, and the figures stay near the fp32 ones (same seeds; bf16 rounds, so not equal)."""
    fp32 = evaluate(_cfg(dev_testbed, small_manifest, tmp_path / "fp32"))
    bf16 = evaluate(_cfg(dev_testbed, small_manifest, tmp_path / "bf16", dtype="bf16"))
    saved = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert saved["runtime"]["dtype"] == "bf16" and saved["dtype"] == "bfloat16"
    assert saved["runtime"]["batch_sizes"]["generation"] >= 1 and saved["runtime"]["peak_memory_gb"] > 0
    assert fp32["runtime"]["dtype"] == "fp32"
    assert bf16["n"] == fp32["n"] and all(0 <= r["sscd_orig_max"] <= 1.0001 for r in bf16["items"])
    assert bf16["sscd_orig_median"] == pytest.approx(fp32["sscd_orig_median"], abs=0.1)


def test_real_testbed_reproduces_its_card(testbed_dir, tmp_path):
    """On the real testbed: evaluate's memorized figures with the card's seeds equal the card's."""
    card = json.loads((testbed_dir / "testbed_card.json").read_text())
    m = evaluate(EvaluateConfig(seeds=card["seeds_per_input"], model=str(testbed_dir / "model"),
                                output_dir=str(tmp_path / "out"), progress=False))
    assert m["metric_backend"] == card["metric_backend"]
    assert m["n"] == card["memorized"]["n"]
    assert m["mr"] == card["memorized"]["mr"]
    assert m["median_sscd"] == pytest.approx(card["memorized"]["median_sscd"], abs=1e-6)


def test_bf16_evaluate_on_the_real_testbed(testbed_dir, tmp_path):
    """`scripts/evaluate.py --dtype bf16` on the real testbed, on the CPU: metrics.json says bf16 and
    the memorized prompts still replicate as the card says they do in fp32."""
    card = json.loads((testbed_dir / "testbed_card.json").read_text())
    out = tmp_path / "bf16"
    r = _run_script(["--dtype", "bf16", "--seeds", "2", "--output_dir", str(out), "--no_progress"], timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["runtime"]["dtype"] == "bf16" and m["dtype"] == "bfloat16" and m["runtime"]["peak_memory_gb"] > 0
    assert m["n"] == card["memorized"]["n"] and m["mr"] >= 0.9


def test_outputs_clip_and_fid(dev_testbed, small_manifest, tmp_path):
    out = tmp_path / "eval"
    m = evaluate(_cfg(dev_testbed, small_manifest, out, fid_prompts=6, seeds=3))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["mr"] == m["mr"] and saved["n"] == 4
    for key in TOP_LEVEL:
        assert isinstance(saved[key], (int, float)), key
    assert set(saved["versions"]) >= {"torch", "diffusers", "memtrain"}
    assert saved["sampler"] == {"scheduler": "ddim", "num_inference_steps": 4, "guidance_scale": 3.0, "batch_size": 16}
    assert saved["seeds"] == [0, 1, 2] and saved["num_processes"] == 1
    assert saved["metric_backend"].startswith("sscd") and not saved["metric_is_standin"]
    assert saved["metric_devices"] == {"sscd": "cpu (onnxruntime CPUExecutionProvider, int8)",
                                       "inception": "cpu (torchscript)", "clip": "cpu (transformers)"}
    assert "metrics ran on | sscd: cpu" in (out / "report.md").read_text()
    assert len(saved["items"]) == 4 and len(saved["items"][0]["sscd_orig"]) == 3
    assert {"id", "prompt", "sscd_orig_max", "d_sscd", "a_clip", "paper002_max_score"} <= set(saved["items"][0])
    # paper 002's combined score
    assert saved["paper002"]["threshold"] == 0.75 and 0 <= saved["paper002"]["input_rate"] <= 1
    # A_CLIP with the testbed's own CLIP
    assert saved["a_clip"]["backend"].startswith("clip-raw") and -1 <= saved["a_clip"]["value"] <= 1
    assert 0 <= saved["clipscore"]["value"] <= 100
    # LPIPS: no weights -> said so, never a number
    assert saved["lpips_diversity"]["status"] == "not computed" and saved["lpips_diversity"]["value"] is None
    # FID/KID offline with the shipped Inception, on the testbed's utility manifest, flagged as small
    assert saved["fid"]["value"] >= 0 and saved["fid"]["n_generated"] == 6 and saved["fid"]["small_set"]
    assert isinstance(saved["kid"]["value"], float) and saved["kid"]["subset_size"] == 6
    assert any("small set" in n for n in saved["notes"])
    assert not any("stand-in" in n for n in saved["notes"])
    # Markdown and grids
    text = (out / "report.md").read_text()
    assert "stand-in" not in text and "| mr |" in text and "not computed" in text and "grids/grid_000.png" in text
    from PIL import Image

    grids = sorted((out / "grids").glob("*.png"))
    assert len(grids) == 1 and Image.open(grids[0]).size == (4 * 130 + 2, 4 * 130 + 2)  # ref + 3 seeds
    assert _no_partial_dirs(tmp_path)


def test_alignment_scorer_ranks_matching_captions(dev_testbed):
    """The testbed CLIP scores training images against their own captions above shuffled ones."""
    import numpy as np
    from PIL import Image

    from memtrain.metrics import AlignmentScorer, ClipScorer

    scorer = ClipScorer(dev_testbed / "clip")
    assert scorer.raw_pixels  # no image processor: fed [-1, 1] pixels as it was trained
    assert isinstance(scorer, AlignmentScorer)
    items = read_manifest(dev_testbed / "manifests" / "unique.jsonl")[:8]
    images = [Image.open(it.image) for it in items]
    prompts = [it.prompt for it in items]
    right = scorer.score(images, prompts)
    wrong = scorer.score(images, prompts[1:] + prompts[:1])
    assert right.shape == (8,) and np.all(np.abs(right) <= 1 + 1e-6)
    assert right.mean() > wrong.mean()


def test_clip_metrics_without_weights_are_not_computed(dev_testbed, small_manifest, tmp_path):
    plain = tmp_path / "plain_model"  # the testbed's model without its testbed (so no clip/)
    shutil.copytree(dev_testbed / "model", plain)
    m = evaluate(_cfg(dev_testbed, small_manifest, tmp_path / "a", model=str(plain), seeds=1))
    for key in ("a_clip", "clipscore"):
        assert m[key]["status"] == "not computed" and m[key]["value"] is None and "--clip_model" in m[key]["reason"]
    assert m["d_sscd"]["status"] == "not computed"  # one seed: no pairwise diversity
    assert m["fid"]["status"] == "not computed"
    assert "a_clip" not in m["items"][0]
    bad = evaluate(_cfg(dev_testbed, small_manifest, tmp_path / "b", model=str(plain), seeds=1,
                        clip_model=str(tmp_path / "nope")))
    assert bad["a_clip"]["status"] == "not computed" and "not found" in bad["a_clip"]["reason"]


def test_sampler_overrides_and_prompt_only_manifest(dev_testbed, small_manifest, tmp_path):
    items = read_manifest(small_manifest)[:2]
    for it in items:
        it.image = None
    prompts_only = write_manifest(tmp_path / "prompts.jsonl", items)
    m = evaluate(_cfg(dev_testbed, prompts_only, tmp_path / "o",
                      sampler=SamplerOverrides(num_inference_steps=2, guidance_scale=1.5, scheduler="dpm")))
    assert m["sampler"]["num_inference_steps"] == 2 and m["sampler"]["scheduler"] == "dpm"
    assert m["sampler"]["guidance_scale"] == 1.5
    assert m["mr"]["status"] == "not computed" and isinstance(m["d_sscd"], float) and m["n"] == 2
    with pytest.raises(MemtrainError, match="unknown scheduler"):
        evaluate(_cfg(dev_testbed, prompts_only, tmp_path / "s", sampler=SamplerOverrides(scheduler="euler")))


# ----------------------------------------------------------------------------- processes, W&B


@pytest.mark.slow  # several processes: the slow tier
def test_one_process_with_wandb_equals_two_processes(dev_testbed, small_manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # chunks of 2 prompts: both processes get work
    a = evaluate(_cfg(dev_testbed, small_manifest, tmp_path / "one", chunk_items=2, report_to="wandb"))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["--model", str(dev_testbed / "model"), "--manifest", str(small_manifest), "--seeds", "2",
            "--no_progress", "--chunk_items", "2",
            "--output_dir", str(tmp_path / "two")]
    # ACCELERATE_USE_CPU: without it --multi_gpu on a CPU machine silently runs 1 process
    two = _run_script(args, launcher=launcher, env={"ACCELERATE_USE_CPU": "true"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "MR=" in two.stdout and "wrote" in two.stdout
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    # same work units -> same batches -> the same numbers, not just close ones
    assert {k: b[k] for k in TOP_LEVEL} == {k: a[k] for k in TOP_LEVEL}
    # A_CLIP runs the CLIP towers under this process's thread count (the launched ranks use one
    # thread), and float reductions differ in the last digits between thread counts.
    strip = lambda items: [{k: v for k, v in it.items() if k != "a_clip"} for it in items]  # noqa: E731
    assert strip(b["items"]) == strip(a["items"])
    assert [it["a_clip"] for it in b["items"]] == pytest.approx([it["a_clip"] for it in a["items"]], rel=1e-4)
    assert b["a_clip"] == pytest.approx(a["a_clip"], rel=1e-4)
    # W&B offline run folder inside the output, with the grid images as media
    runs = list((tmp_path / "one" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list((runs[0] / "files" / "media" / "images").glob("*.png"))
    assert _no_partial_dirs(tmp_path)


@pytest.mark.slow  # several processes: the slow tier
def test_killed_two_process_evaluate_resumes_to_the_same_metrics(dev_testbed, tmp_path):
    """SIGKILL both ranks at a random moment after the first finished unit (one prompt each);
    the same command with --resume writes the uninterrupted run's metrics.json."""
    from factories import kill_after_first_unit
    from memtrain.core.journal import journal_dir

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {"ACCELERATE_USE_CPU": "true"}

    def args(out: Path) -> list[str]:
        return ["--model", str(dev_testbed / "model"), "--seeds", "2", "--no_progress", "--chunk_items", "1",
                "--output_dir", str(out)]

    whole = _run_script(args(tmp_path / "whole"), launcher=launcher, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    seed = int.from_bytes(os.urandom(2), "little")
    print(f"kill seed {seed}")  # shown on failure: the moment can be replayed
    done = kill_after_first_unit([*launcher, str(REPO / "scripts" / "evaluate.py"), *args(out)], out,
                                 {**os.environ, **SUBPROCESS_ENV, **env}, REPO, seed, max_units=3)
    assert done >= 1 and not out.exists()
    resumed = _run_script([*args(out), "--resume"], launcher=launcher, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming:" in resumed.stderr
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    for doc in (a, b):
        doc.pop("seconds"), doc.pop("output_dir"), doc.pop("runtime")  # peak memory differs run to run
    assert b == a
    assert not journal_dir(out).exists() and _no_partial_dirs(tmp_path)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def script():
    return _load_script("evaluate")


def _fails(script, capsys, argv: list[str], match: str) -> str:
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(match, lines[0]), err
    return lines[0]


def test_bad_inputs_fail_in_one_line(dev_testbed, small_manifest, tmp_path, script, capsys):
    model = ["--model", str(dev_testbed / "model"), "--no_progress"]
    out = ["--output_dir", str(tmp_path / "out")]
    _fails(script, capsys, [*model, *out, "--manifest", str(tmp_path / "missing.jsonl")], "manifest file not found")
    (tmp_path / "bad.jsonl").write_text("prompt,image\na cat,cat.png\n")
    _fails(script, capsys, [*model, *out, "--manifest", str(tmp_path / "bad.jsonl")], "not a JSON object")
    (tmp_path / "noprompt.jsonl").write_text('{"id": "a", "image": "x.png"}\n')
    _fails(script, capsys, [*model, *out, "--manifest", str(tmp_path / "noprompt.jsonl")], 'no "prompt"')
    _fails(script, capsys, [*model, *out, "--manifest", str(small_manifest), "--seeds", "0"], "seeds must be >= 1")
    # an unreadable image
    items = read_manifest(small_manifest)[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items[1].image = str(broken)
    _fails(script, capsys, [*model, *out, "--manifest", str(write_manifest(tmp_path / "u.jsonl", items))],
           "cannot be read")
    # a missing image: refused with --strict
    items[1].image = str(tmp_path / "gone.png")
    missing = write_manifest(tmp_path / "m.jsonl", items)
    _fails(script, capsys, [*model, *out, "--manifest", str(missing), "--strict"], "image not found")
    assert not (tmp_path / "out").exists() and _no_partial_dirs(tmp_path)
    # the output dir exists: refused, untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    _fails(script, capsys, [*model, *out, "--manifest", str(small_manifest)], "already exists.*--overwrite")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_missing_image_is_skipped_and_reported(dev_testbed, small_manifest, tmp_path):
    items = read_manifest(small_manifest)[:3]
    items[1].image = str(tmp_path / "gone.png")
    manifest = write_manifest(tmp_path / "m.jsonl", items)
    m = evaluate(_cfg(dev_testbed, manifest, tmp_path / "out", seeds=1))
    assert m["n"] == 2 and [r["id"] for r in m["items"]] == [items[0].id, items[2].id]
    assert m["manifest"]["skipped"] == [{"id": items[1].id, "reason": f"image not found: {items[1].image}"}]
    assert "Skipped" in (tmp_path / "out" / "report.md").read_text()


def test_failure_leaves_nothing_and_overwrite_replaces(dev_testbed, small_manifest, tmp_path, monkeypatch):
    import memtrain.eval.evaluate as ev

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def boom(*args, **kwargs):
        raise RuntimeError("failure after generation")

    with monkeypatch.context() as patch:
        patch.setattr(ev, "assemble", boom)
        with pytest.raises(RuntimeError):
            evaluate(_cfg(dev_testbed, small_manifest, out, seeds=1, overwrite=True))
    assert [p.name for p in out.iterdir()] == ["old.txt"] and _no_partial_dirs(tmp_path)
    evaluate(_cfg(dev_testbed, small_manifest, out, seeds=1, overwrite=True))
    assert not (out / "old.txt").exists() and (out / "metrics.json").is_file()


def test_exit_code_from_a_real_process(tmp_path):
    res = _run_script(["--manifest", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path / "o")])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error:") and "not found" in res.stderr


# ----------------------------------------------------------------------------- benchmark


def test_bench_sampling_prints_a_speedup(dev_testbed, capsys):
    bench = _load_script("bench_sampling")
    bench.main(["--model", str(dev_testbed), "--prompts", "4", "--batch", "4", "--steps", "2"])
    text = capsys.readouterr().out
    assert re.search(r"speedup: \d+\.\d\d\n$", text)
    assert "images/s" in text and str(dev_testbed / "model") in text
