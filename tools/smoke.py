"""The full-size smoke: every command, as the README prints it, on random-weight SD fixtures.

For each variant (default: sd14 and sd21-base at 256 px) it builds the fixture once into the
work folder, writes the LAION-like photo manifests, then runs each command with the smallest
budgets as a subprocess and checks what it wrote (not only its exit code). Each step's wall time
and the peak resident memory of its process go into WORK/smoke.json. Figures from random
weights mean nothing; that every path runs at SD's real shapes and sizes is the point.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from memtrain.core.errors import MemtrainError
from memtrain.core.files import write_json
from memtrain.core.manifest import read_manifest, write_manifest
from memtrain.mitigations import available_mitigations
from memtrain.testbed.photos import write_photo_manifests

REPO = Path(__file__).resolve().parents[1]
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
       # `--multi_gpu` without a GPU is 2-process DDP over gloo only when accelerate is told so
       **({} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "true"})}
FINETUNE = [  # recipes/sd14.yaml at the smallest budget that still runs each part once
    "train.epochs=1", "train.updates_per_embedding=1", "train.surrogate_batch_size=1", "train.mixed_precision=no",
    "attack.steps=2", "attack.noise_samples=1", "surrogates.mitigation=pad_mask", "surrogates.mitigation_settings={}",
    "surrogates.per_prompt=1",
    "surrogates.sampler.num_inference_steps=2", "audit.seeds=1", "audit.max_items=1", "audit.kid=false",
    "audit.sampler.num_inference_steps=2", "audit.full_recipe=recipes/audit_smoke.yaml", "audit.full_max_targets=1",
    "checkpointing.steps=2", "checkpointing.total_limit=1", "report_to=wandb",
]


def run_step(argv: list[str], log: Path) -> dict:
    """Run one command; its wall time, exit code and peak RSS (GB; the scripts run in one process)."""
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **ENV}, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.time() - start, 1), "exit_code": code, "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / f"{name}.py"), *map(str, args)]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the smoke prints its own rows only
        pass


def _serve(folder: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def steps(model: Path, photos: Path, out: Path) -> list[tuple[str, list[str], Callable[[], None]]]:
    """(name, command, check of its outputs) for every command on one fixture."""
    mem, held = photos / "memorized.jsonl", photos / "held_out.jsonl"
    common = ["--model", model, "--seeds", "1", "--no_progress"]

    def check_evaluate() -> None:
        m = json.loads((out / "evaluate" / "metrics.json").read_text())
        assert m["manifest"]["n_evaluated"] == 4 and isinstance(m["mr"], float), m["manifest"]

    def check_triage() -> None:
        t = json.loads((out / "triage" / "triage.json").read_text())
        assert t["n_replicating"] + t["n_non_replicating"] == 4, t

    def check_audit() -> None:
        r = json.loads((out / "audit" / "report.json").read_text())
        expected = ["none"] + [n for n in available_mitigations() if n != "none"]
        names = list(dict.fromkeys(x["mitigation"] for x in r["results"]))  # a row per threat model
        assert names == expected, names
        # a bypassed row ran nothing (the attacker samples without the mitigation): nothing to restore
        assert all(x["verdict"] and (x["verdict"] == "bypassed" or x["weights_restored"]) for x in r["results"]), \
            [(x["label"] if "label" in x else x["mitigation"], x["verdict"]) for x in r["results"]]

    def check_detect() -> None:
        d = json.loads((out / "detect" / "detect.json").read_text())["detectors"]
        assert set(d) == {"wen", "nemo", "transition_point", "overestimation", "wen_all_steps", "ren_entropy"}, sorted(d)
        assert all(0.0 <= r["auc"] <= 1.0 and len(r["scores"]["memorized"]) == 4 for r in d.values()), d

    def check_analyze() -> None:
        for name in ("guidance", "overestimation"):
            doc = json.loads((out / "analyze" / f"{name}.json").read_text())
            assert doc["analysis"] == name and list((out / "analyze").glob(f"{name}*.png")), sorted(doc)

    def check_finetune(name: str, world: int = 1, distributed: str | None = None) -> Callable[[], None]:
        def check() -> None:
            report = json.loads((out / name / "audit" / "report.json").read_text())
            assert "memorization" in report and (out / name / "model").is_dir(), sorted(report)
            assert list((out / name / "wandb").glob("offline-run-*")) or list((out / name).rglob("offline-run-*"))
            if world > 1:  # the ranks really ran together and ended on the same weights
                sums = [json.loads((out / name / "debug" / f"rank{r}_checksum.json").read_text()) for r in range(world)]
                assert {c["world_size"] for c in sums} == {world}, sums
                assert len({c["sha256"] for c in sums}) == 1, sums
                assert sums[0]["distributed_type"] == f"DistributedType.{distributed}", sums[0]
                assert distributed != "DEEPSPEED" or sums[0]["zero_stage"] == 2, sums[0]
        return check

    finetune = _script("adv_finetune", "recipes/sd14.yaml", f"model={model}", f"memorized_manifest={mem}",
                       "utility.format=manifest", f"utility.path={held}", f"audit.heldout_manifest={held}", *FINETUNE)
    return [
        ("evaluate", _script("evaluate", *common, "--manifest", mem, "--steps", "2", "--output_dir", out / "evaluate"),
         check_evaluate),
        ("triage", _script("triage", mem, *common, "--steps", "2", "--output_dir", out / "triage"), check_triage),
        # NeMo's memorization score compares seeds: the audit and detect need two
        ("audit", _script("audit", "--mitigation", "all", *common, "--seeds", "2",
                          "--manifest", mem, "--control_manifest", held, "--reference_manifest", held,
                          "--recipe", "recipes/audit_smoke.yaml", "--output_dir", out / "audit"), check_audit),
        ("detect", _script("detect", "--model", model, "--memorized", mem, "--non_memorized", held, "--seeds", "2",
                           "--num_inference_steps", "2", "--output_dir", out / "detect", "--no_progress"), check_detect),
        ("analyze", _script("analyze", "guidance", "overestimation", *common, "--manifest", mem, "--non_memorized", held,
                            "--set", "sampler.num_inference_steps=4", "--output_dir", out / "analyze"), check_analyze),
        ("adv_finetune full", finetune + [f"output_dir={out / 'finetune_full'}"], check_finetune("finetune_full")),
        ("adv_finetune lora", finetune + ["train.finetune=lora", f"output_dir={out / 'finetune_lora'}"],
         check_finetune("finetune_lora")),
        # two processes hold a U-Net each: only LoRA fits twice in 24 GB (a full one peaks at 16-18 GB)
        ("adv_finetune lora ddp", _launch(["--multi_gpu"], finetune, "finetune_lora_ddp", out),
         check_finetune("finetune_lora_ddp", world=2, distributed="MULTI_GPU" if torch.cuda.is_available()
                        else "MULTI_CPU")),
        ("adv_finetune lora zero2", _launch(["--use_deepspeed", "--deepspeed_config_file",
                                             str(REPO / "accelerate_configs" / "ds_zero2.json")],
                                            finetune, "finetune_lora_zero2", out),
         check_finetune("finetune_lora_zero2", world=2, distributed="DEEPSPEED")),
    ]


def _launch(flags: list[str], finetune: list[str], name: str, out: Path) -> list[str]:
    """The LoRA fine-tuning command under a 2-process `accelerate launch` on the CPU (gloo)."""
    # ACCELERATE_USE_CPU makes accelerate drop DeepSpeed silently (plain MULTI_CPU): only DDP gets it
    unset = [] if "--multi_gpu" in flags else ["env", "-u", "ACCELERATE_USE_CPU"]
    return [*unset, sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *finetune[1:], "train.finetune=lora",
            "debug_rank_checksums=true", f"output_dir={out / name}"]


def fetch_step(photos: Path, out: Path) -> tuple[str, list[str], Callable[[], None], http.server.HTTPServer]:
    """fetch_images on the photos served over local HTTP (the only network here)."""
    server = _serve(photos)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    items = read_manifest(photos / "memorized.jsonl")
    for it in items:
        it.url, it.image = f"{base}/{Path(it.image).name}", None
    release = write_manifest(out / "release_urls.jsonl", items)

    def check() -> None:
        report = json.loads((out / "fetch" / "fetch_report.json").read_text())
        assert report["fetched"] == 4 and not report["dead"], report

    return "fetch_images", _script("fetch_images", release, "--output_dir", out / "fetch", "--no_progress"), check, server


def _check_built(model: Path) -> None:
    assert (model / "model_index.json").is_file() and (model / "unet").is_dir(), f"no diffusers folder at {model}"


def _key(row: dict) -> tuple:
    return row.get("variant"), row.get("resolution"), row["step"]


def _earlier_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def _drop_checkpoints(folder: Path) -> float:
    """Delete the fine-tuning checkpoints under `folder` (a full SD one is ~10 GB: U-Net and Adam
    states in fp32); their size in GB. The fine-tuned model and the reports stay."""
    size = 0.0
    for ckpts in folder.glob("*/checkpoints"):
        size += sum(f.stat().st_size for f in ckpts.rglob("*") if f.is_file()) / 2**30
        shutil.rmtree(ckpts)
    return round(size, 1)


def run_smoke(work: Path, variants: list[str], only: set[str] | None = None, resolution: int = 256,
              keep_checkpoints: bool = False) -> list[dict]:
    """Every step on every variant; a failed step is recorded (with its log) and the rest go on.

    Checkpoints are deleted once a step has been checked (`keep_checkpoints` keeps them): both
    variants' fine-tuning runs would otherwise write ~60 GB.

    `resolution` is the fixtures' default image size: the weights and their shapes are SD's at any
    size, only the activations (and so the CPU time) shrink with it.
    """
    work.mkdir(parents=True, exist_ok=True)
    photos = work / "photos"
    if not (photos / "memorized.jsonl").is_file():
        write_photo_manifests(photos)
    results, earlier = [], _earlier_rows(work / "smoke.json")
    name, argv, check, server = fetch_step(photos, work)
    todo = [(None, work, name, argv, check)] if not only or name in only else []
    for variant in variants:
        model = work / f"{variant}-{resolution}"
        out = work / f"{variant}-{resolution}px"  # its logs and outputs
        if not (model / "model_index.json").is_file():  # built once, kept for the next smoke
            build = _script("build_sd_fixture", variant, model, "--resolution", str(resolution), "--overwrite")
            todo.append((variant, out, "build_sd_fixture", build, functools.partial(_check_built, model)))
        todo += [(variant, out, n, a, c) for n, a, c in steps(model, photos, out) if not only or n in only]
    for variant, folder, name, argv, check in todo:
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"{name.replace(' ', '_')}.log"
        row = {"variant": variant, "resolution": resolution, "step": name, **run_step(argv, log), "log": str(log)}
        try:
            if row["exit_code"] != 0:
                raise MemtrainError(log.read_text().strip().splitlines()[-1] if log.stat().st_size else "no output")
            check()
            row["ok"] = True
            if not keep_checkpoints and name.startswith("adv_finetune"):
                row["checkpoints_gb"] = _drop_checkpoints(folder)
        except (AssertionError, MemtrainError, OSError, KeyError, ValueError) as e:
            row.update(ok=False, error=str(e)[:300])
        results.append(row)
        print(json.dumps(row), flush=True)
        # a rerun of some steps (--only) replaces their rows and keeps the others' figures
        done = {_key(r) for r in results}
        write_json(work / "smoke.json", [r for r in earlier if _key(r) not in done] + results)
    server.shutdown()
    return results
