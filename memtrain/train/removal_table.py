"""Paper 004's Tables 3 and 5 by one command: each removal method trained from the original model,
then audited against it as a weight edit (`edited_weights`) under Dori and the prompt attacks.

For each method of `methods` (`esd`, `concept_ablation`, `siss`: memtrain.train.removal;
`adv_finetune`: memtrain.train.trainer with the project's fine-tuning recipe) the table trains into
OUT/<method>/ (model/, or <item id>/model/ per item for SISS), times the training and its peak
memory, and audits the result against the original model: `none` once (OUT/audits/original), then
each method as `edited_weights` (OUT/audits/<method>) under `weights` and `embedding` (Dori) and
`prompt` (the first of `prompt_attacks`; each further one audits the `prompt` threat model again,
OUT/audits/<method>-<attack>), each with the held-out control. The rows go to OUT/removal.json and
OUT/removal.md (memtrain.train.removal_report).

The table is written in OUT itself (its model folders and audits name their own paths) and is
complete once OUT/removal.json exists. --overwrite sets a previous OUT aside (`.OUT.previous`) and
deletes it only once the new table is complete; where no method could run it is put back. A killed
table resumes per method (--resume, same recipe): a finished method (its row.json) is reused, a
training continues from its latest checkpoint, an audit from its last finished unit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memtrain.core import run as dist
from memtrain.core.bundle import ModelDefaults
from memtrain.core.command_line import merge
from memtrain.core.errors import MemtrainError
from memtrain.core.files import write_json
from memtrain.core.manifest import read_manifest, write_manifest
from memtrain.core.report import CommandResult, to_jsonable, versioned
from memtrain.core.runtime import peak_memory_bytes
from memtrain.eval.audit import audit, audit_config
from memtrain.train import removal_report
from memtrain.train.checkpoints import checkpoint_dirs
from memtrain.train.recipe import Recipe
from memtrain.train.removal import RemovalRun, train_removal
from memtrain.train.removal_config import FINETUNE, RemovalTableConfig
from memtrain.train.outputs import drop_previous, set_aside_previous
from memtrain.train.removal_report import ORIGINAL, method_row, not_run_row
from memtrain.train.trainer import train

log = logging.getLogger("memtrain")


@dataclass
class RemovalTable(CommandResult):
    """What `memtrain removal` returns: removal.json's document and where it was written."""

    @property
    def rows(self) -> list[dict]:
        return list(self.report.get("rows", []))

    def row(self, method: str) -> dict:
        for r in self.rows:
            if r["method"] == method:
                return r
        raise MemtrainError(f"the removal table has no row for '{method}'")


# ----------------------------------------------------------------------------- peak memory


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's max allocated, or on Linux the process's resident high-water mark
    (elsewhere the peak stays the process's since it started)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gb(device: torch.device) -> float:
    """The peak since reset_peak_memory, in GB (10^9 bytes)."""
    status = Path("/proc/self/status")
    found = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if device.type != "cuda" and status.is_file() else None
    return round((int(found.group(1)) * 1024 if found else peak_memory_bytes(device)) / 1e9, 3)


# ----------------------------------------------------------------------------- the run


@dataclass
class Table:
    """One table's run: config, the original model's defaults, the accelerator, the working folder."""

    cfg: RemovalTableConfig
    defaults: ModelDefaults
    finetune: Recipe | None
    acc: object
    out: Path
    manifest: Path = field(init=False)
    items: list = field(default_factory=list)

    def write(self, path: Path, doc: dict) -> None:
        """`doc` as JSON on the main process; every process meets afterwards."""
        if dist.is_main(self.acc):
            write_json(path, to_jsonable(doc))
        dist.wait(self.acc)


def open_work(cfg: RemovalTableConfig, acc) -> tuple[Path, Path | None]:
    """OUT, ready (cfg.check_files said what a taken one may hold): under --overwrite a previous
    table is set aside (returned; deleted once this one is complete)."""
    out = Path(cfg.output_dir).absolute()
    dist.run_checked(cfg.check_output, acc)  # again: the launch's processes may have raced
    previous = set_aside_previous(cfg, acc, out)
    dist.run_checked(lambda: write_json(out / "table.json", cfg.fingerprint()) if dist.is_main(acc) else None, acc)
    return out, previous


def audited(t: Table, name: str, values: dict) -> dict:
    """One audit of the table against the original model (OUT/audits/<name>): its report.json,
    read back when it finished before (resume), else run (continuing its own journal)."""
    out = t.out / "audits" / name
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    cfg = t.cfg
    base = {"model": t.defaults.model_dir, "manifest": str(t.manifest), "control_manifest": cfg.control_manifest,
            "utility_manifest": cfg.utility_manifest, "output_dir": str(out), "resume": True, "progress": cfg.progress,
            "metric": cfg.metric, "allow_standin": cfg.allow_standin, "clip_model": cfg.clip_model,
            **dataclasses.asdict(cfg.runtime)}
    config = audit_config(t.defaults, merge(merge(copy.deepcopy(cfg.audit), base), values), recipe=cfg.audit_recipe)
    return audit(config, t.defaults, accelerator=t.acc).report


def audit_all(t: Table, name: str, mitigation: str, settings: dict | None = None, per_prompt: bool = False) -> dict:
    """The main audit (every threat model; the first prompt attack) and one `prompt` audit per
    further prompt attack: {attack name or "main": report}."""
    values = {"mitigations": [mitigation], "threat_models": None, "prune_per_prompt": per_prompt,
              "prompt_attack": t.cfg.prompt_attacks[0]}
    if settings is not None:
        values["mitigation_settings"] = {mitigation: settings}
    reports = {"main": audited(t, name, values)}
    for attack in t.cfg.prompt_attacks[1:]:
        reports[attack] = audited(t, f"{name}-{attack}", {**values, "threat_models": ["prompt"], "prompt_attack": attack})
    return reports


def trained(t: Table, method: str) -> RemovalRun:
    """The method trained from the original model into OUT/<method>, timed, its peak memory
    measured (a finished training is read back on resume; a killed one continues from its latest
    checkpoint). A MemtrainError (every item skipped, ...) is the caller's "not run"."""
    folder = t.out / method
    saved = folder / "removal_run.json"
    if saved.is_file():
        return RemovalRun(**json.loads(saved.read_text()))
    resume = "latest" if any(checkpoint_dirs(p) for p in folder.rglob("checkpoints")) else None  # per item too
    leftover = resume is None and folder.is_dir() and any(folder.iterdir())  # killed before its first checkpoint
    device = t.acc.device
    reset_peak_memory(device)
    start = time.time()
    if method == FINETUNE:
        recipe = dataclasses.replace(t.finetune, output_dir=str(folder), memorized_manifest=str(t.manifest),
                                     seed=t.cfg.seed, report_to=t.cfg.report_to, progress=t.cfg.progress,
                                     overwrite=leftover)
        model_dir = train(recipe, resume_from_checkpoint=resume, defaults=t.defaults)
        summary = json.loads((folder / "run_summary.json").read_text()) if (folder / "run_summary.json").is_file() else {}
        run = RemovalRun(method=method, model_dirs={it.id: str(model_dir) for it in t.items}, skipped={},
                         seconds=0.0, peak_memory_gb=0.0, summary=summary)
    else:
        recipe = t.cfg.removal_recipe(method, str(folder), str(t.manifest), t.defaults.model_dir, overwrite=leftover)
        run = train_removal(recipe, defaults=t.defaults, resume_from_checkpoint=resume)
    peak = max(dist.gather_list([peak_memory_gb(device)], t.acc))
    measured = {"seconds": round(time.time() - start, 1), "peak_memory_gb": peak}
    own = {} if method == FINETUNE else {"reported_by_the_training": {"seconds": run.seconds,
                                                                    "peak_memory_gb": run.peak_memory_gb}}
    run = dataclasses.replace(run, **measured, summary={**run.summary, **own,
                                                        **({"resumed_from": resume} if resume else {})})
    t.write(saved, dataclasses.asdict(run))
    return run


def training(t: Table, method: str) -> RemovalRun | str | None:
    """The method's RemovalRun, or why it could not run (a MemtrainError: every item skipped, ...);
    a finished method's row.json makes both moot (None)."""
    if (t.out / method / "row.json").is_file():
        return None
    start = time.time()
    if t.cfg.progress and dist.is_main(t.acc):
        log.info("removal table: training %s (%d items)", method, len(t.items))
    try:
        run = trained(t, method)
    except MemtrainError as err:
        log.warning("removal table: %s did not run: %s", method, err)
        return f"{err} (after {time.time() - start:.0f} s)"
    if t.cfg.progress and dist.is_main(t.acc):
        log.info("removal table: %s trained in %.0f s (%d skipped)", method, time.time() - start, len(run.skipped))
    return run if any(it.id in run.model_dirs for it in t.items) else "every item was skipped"


def method_result(t: Table, method: str, run: RemovalRun | str | None) -> tuple[dict, dict]:
    """One method's row: audited against the original model (or read back from its row.json on
    resume; a method that could not run has a `not run` row)."""
    done = t.out / method / "row.json"
    if run is None:
        saved = json.loads(done.read_text())
        return saved["row"], saved["details"]
    if isinstance(run, str):
        row, details = not_run_row(method, run, t.items)
    else:
        dirs = [run.model_dirs[it.id] for it in t.items if it.id in run.model_dirs]
        per_item = len(set(dirs)) > 1  # SISS: a model per image
        settings = {"model": dirs[0], "manifest": str(t.manifest), "unmapped": "original",
                    "per_prompt": dict(run.model_dirs) if per_item else {}}
        start = time.time()
        row, details = method_row(method, "edited_weights", audit_all(t, method, "edited_weights", settings, per_item),
                                  run)
        if t.cfg.progress and dist.is_main(t.acc):
            log.info("removal table: %s audited in %.0f s: %s", method, time.time() - start, row["verdict"])
    t.write(done, {"row": row, "details": details})
    return row, details


def run_table(cfg: RemovalTableConfig, defaults: ModelDefaults, finetune: Recipe | None = None) -> RemovalTable:
    """Train and audit every method of `cfg` against the original model (`defaults`: resolved by
    the command; `finetune`: the resolved fine-tuning recipe when adv_finetune is listed); returns
    the table (its writer: memtrain.train.removal_report.write, called here on the main process)."""
    from_start = time.time()
    precision = finetune.train.mixed_precision if finetune is not None else None
    if cfg.removal_methods:
        precision = cfg.removal_recipe(cfg.removal_methods[0], "-", "-").train.mixed_precision
    acc = dist.make_accelerator(None, precision, timeout_minutes=cfg.timeout_minutes)
    out, previous = open_work(cfg, acc)
    t = Table(cfg, defaults, finetune, acc, out)
    source = cfg.memorized_manifest or defaults.manifest("memorized")
    if source is None:
        raise MemtrainError(f"no memorized_manifest given and the model '{defaults.model_dir}' brings none: name one")
    t.items = list(read_manifest(source, require_images=True))[: cfg.items]
    t.manifest = t.out / "memorized.jsonl"
    dist.run_checked(lambda: write_manifest(t.manifest, t.items) if dist.is_main(acc) else None, acc)
    runs = {method: training(t, method) for method in cfg.methods}  # every training before any audit
    if all(isinstance(run, str) for run in runs.values()):
        reasons = "; ".join(f"{m}: {why}" for m, why in runs.items())
        if previous is not None and dist.is_main(acc):  # the previous table back in place
            shutil.rmtree(out)
            previous.rename(out)
        raise MemtrainError(f"no removal method could run ({reasons})"
                            + ("; the previous table is back in place" if previous is not None else ""))
    rows, details = {}, {}
    rows[ORIGINAL], details[ORIGINAL] = method_row(ORIGINAL, ORIGINAL, audit_all(t, "original", ORIGINAL), None)
    for method in cfg.methods:
        rows[method], details[method] = method_result(t, method, runs[method])
    doc = versioned({"rows": [rows[m] for m in [ORIGINAL, *cfg.methods]], "methods": details,
                     "settings": {**cfg.fingerprint(), "items": [it.id for it in t.items],
                                  "model_dir": defaults.model_dir, "seconds": round(time.time() - from_start, 1)}})
    table = RemovalTable(to_jsonable(doc), out)
    if dist.is_main(acc):
        removal_report.write(table, out, paper=cfg.paper)  # removal.json last: the table is complete
    dist.wait(acc)
    drop_previous(acc, previous)
    acc.end_training()
    return table
