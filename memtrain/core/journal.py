"""The finished units of work of a long command, kept so that a killed run can resume.

A command that writes OUT (audit, evaluate) keeps `.OUT.resume/` beside it while it works:

    fingerprint.json        what the run is (command line, recipe, model, manifests, code): a resume
                            with anything else is refused, naming the first difference
    units/<key>.json        one finished unit (a chunk of targets in one stage, ...): its JSON part
    units/<key>.safetensors its arrays (no pickle: safetensors and JSON are all that is read back)

Each unit is written atomically by the process that computed it, the JSON part last, so a unit
is either complete or absent whatever moment a process is killed at. Units are keyed by global
chunk index, not by process, so a run resumed with another number of processes reuses them.
The folder is removed once OUT is complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from memtrain.core import run as dist
from memtrain.core.config import first_difference
from memtrain.core.errors import MemtrainError
from memtrain.core.files import atomic_write_bytes, sha256_file, write_json
from memtrain.core.provenance import code_version
from memtrain.core.report import to_jsonable

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


def journal_dir(output_dir: str | Path) -> Path:
    """Where the work journal of the run writing `output_dir` lives (a hidden sibling)."""
    out = Path(output_dir).absolute()
    return out.parent / f".{out.name}.resume"


def check_fresh_start(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Without --resume, refuse to throw away an interrupted run's work (unless --overwrite)."""
    folder = journal_dir(output_dir)
    units = len(list((folder / "units").glob("*.json"))) if not (resume or overwrite) else 0
    if units:  # a journal without finished units holds nothing to lose
        raise MemtrainError(f"output dir '{output_dir}' has an interrupted run's work ({units} finished units in "
                            f"{folder}): pass --resume to continue it, or --overwrite to start over")


class WorkJournal:
    """Finished units of one run: `journal.unit(key, compute, encode, decode)` returns the saved
    result when the unit was finished before (resume), else computes, saves and returns it."""

    def __init__(self, output_dir: str | Path, fingerprint: dict, resume: bool, accelerator=None):
        self.folder = journal_dir(output_dir)
        self.units = self.folder / "units"
        self.accelerator = accelerator
        fingerprint = {**fingerprint, "code": code_version()}  # resuming with other code is refused too
        dist.run_checked(lambda: self._open(fingerprint, resume), accelerator)
        # every process lists the finished units before any process writes a new one
        self.finished = {p.stem for p in self.units.glob("*.json")} if self.units.is_dir() else set()
        dist.wait(accelerator)
        self.reused = 0

    def _open(self, fingerprint: dict, resume: bool) -> None:
        saved_file = self.folder / FINGERPRINT
        if resume and saved_file.is_file():
            saved = json.loads(saved_file.read_text())
            current = json.loads(json.dumps(to_jsonable(fingerprint)))
            diff = first_difference(saved, current, labels=("interrupted run", "now"))
            if diff:
                raise MemtrainError(f"cannot resume the run in {self.folder}: {diff}; rerun it as it was, "
                                    "or without --resume and with --overwrite to start over")
            if dist.is_main(self.accelerator):
                log.info("resuming: %d finished units in %s", len(list(self.units.glob("*.json"))), self.folder)
            return
        dist.wait(self.accelerator)  # every process has checked the folder before main clears it
        if dist.is_main(self.accelerator):
            if resume:
                log.info("nothing to resume in %s: starting from the beginning", self.folder)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.units.mkdir(parents=True)
            write_json(saved_file, fingerprint)

    def unit(self, key: str, compute: Callable[[], Any], encode: Callable[[Any], tuple[dict, Any]],
             decode: Callable[[dict, Any], Any], collective: bool = False) -> Any:
        """The result of unit `key`: loaded if finished before, else computed and saved. Call it
        on the process that owns the unit; a `collective` unit (every process computes it
        together and gets the same result) is called on every process and saved by the main one."""
        if not _KEY.match(key):
            raise ValueError(f"bad unit key {key!r}")
        if key in self.finished:
            self.reused += 1
            return decode(*self._load(key))
        result = compute()
        if not collective or dist.is_main(self.accelerator):
            self._save(key, *encode(result))
        return result

    def _load(self, key: str) -> tuple[dict, Any]:
        from safetensors.numpy import load_file

        arrays_file = self.units / f"{key}.safetensors"
        arrays = load_file(str(arrays_file)) if arrays_file.is_file() else {}
        return arrays, json.loads((self.units / f"{key}.json").read_text())["meta"]

    def _save(self, key: str, arrays: dict[str, np.ndarray], meta: Any) -> None:
        from safetensors.numpy import save

        if arrays:
            atomic_write_bytes(self.units / f"{key}.safetensors",
                               save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
        write_json(self.units / f"{key}.json", {"meta": meta})  # last: its presence means complete

    def close(self) -> None:
        """The output is complete: the journal is no longer needed."""
        dist.wait(self.accelerator)
        if dist.is_main(self.accelerator):
            shutil.rmtree(self.folder, ignore_errors=True)


class NoJournal:
    """The journal's interface for callers that keep none (a library call without an output)."""

    reused = 0

    def unit(self, key, compute, encode, decode, collective=False):
        return compute()

    def close(self) -> None:
        pass


def file_digests(paths: Sequence[str | Path | None]) -> dict[str, str]:
    """sha256 of each named file (None entries skipped): a resume refuses changed inputs."""
    return {str(Path(path).absolute()): sha256_file(path) for path in paths if path is not None}


# ----------------------------------------------------------------------------- records <-> files


def encode_records(pairs: Sequence[tuple[int, Any]]) -> tuple[dict[str, np.ndarray], list]:
    """(global index, dataclass) pairs as arrays + JSON: numpy fields (and lists of them) go to
    the arrays, everything else (str, int, float, None) to the JSON part."""
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for row, (index, record) in enumerate(pairs):
        plain: dict[str, Any] = {}
        for f in dataclasses.fields(record):
            value = getattr(record, f.name)
            if isinstance(value, np.ndarray):
                arrays[f"{row}.{f.name}"] = value
                plain[f.name] = {"array": True}
            elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
                for j, v in enumerate(value):
                    arrays[f"{row}.{f.name}.{j}"] = v
                plain[f.name] = {"arrays": len(value)}
            else:
                plain[f.name] = {"value": value}
        meta.append({"index": index, "fields": plain})
    return arrays, meta


def encode_stages(stages: dict[str, Sequence[tuple[int, Any]]]) -> tuple[dict[str, np.ndarray], dict]:
    """Several named lists of records in one unit (e.g. a chunk's prompt rows and attack rows)."""
    arrays, meta = {}, {}
    for name, pairs in stages.items():
        a, meta[name] = encode_records(pairs)
        arrays.update({f"{name}/{k}": v for k, v in a.items()})
    return arrays, meta


def stages_decoder(cls: type) -> Callable[[dict, dict], dict[str, list[tuple[int, Any]]]]:
    """The inverse of encode_stages for records of dataclass `cls`."""
    one = decoder(cls)

    def decode(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, list[tuple[int, Any]]]:
        return {name: one({k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}/")}, m)
                for name, m in meta.items()}

    return decode


def json_unit() -> tuple[Callable[[Any], tuple[dict, Any]], Callable[[dict, Any], Any]]:
    """(encode, decode) for a unit whose result is plain JSON (lists come back as lists)."""
    return (lambda result: ({}, result)), (lambda arrays, meta: meta)


def decoder(cls: type) -> Callable[[dict, list], list[tuple[int, Any]]]:
    """The inverse of encode_records for records of dataclass `cls`."""
    def decode(arrays: dict[str, np.ndarray], meta: list) -> list[tuple[int, Any]]:
        out = []
        for row, entry in enumerate(meta):
            kwargs = {}
            for name, spec in entry["fields"].items():
                if "array" in spec:
                    kwargs[name] = arrays[f"{row}.{name}"]
                elif "arrays" in spec:
                    kwargs[name] = [arrays[f"{row}.{name}.{j}"] for j in range(spec["arrays"])]
                else:
                    kwargs[name] = spec["value"]
            out.append((entry["index"], cls(**kwargs)))
        return out

    return decode
