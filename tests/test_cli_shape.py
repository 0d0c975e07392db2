"""One shape for every command: the `memtrain` entry point lists them all, every flag shows its
default, the shared option groups are checked by the same rules everywhere, a recipe key, a
`key=value` override, `--set` and a flag set the same field, and a bad --model is refused in
one line (exit 2, no traceback) before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.commands import COMMANDS, command
from memtrain.core.command_line import parse_command_line
from memtrain.core.errors import MemtrainError
from memtrain.core.options import MetricOptions, ModelOptions, OutputOptions

REPO = Path(__file__).resolve().parents[1]
SHARED = {ModelOptions: ("--model", "--lora", "--device", "--dtype", "--max_memory"),
          OutputOptions: ("--output_dir", "--overwrite", "--resume", "--report_to", "--progress"),
          MetricOptions: ("--metric", "--allow_standin")}
# the commands that run a model with the shared option groups (build/fetch/bench have their own)
MODEL_COMMANDS = ("audit", "evaluate", "triage", "detect", "analyze", "finetune")


def memtrain(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memtrain", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "WANDB_MODE": "offline"})


def test_memtrain_help_lists_every_command():
    proc = memtrain("--help")
    assert proc.returncode == 0
    for name in ("audit", "evaluate", "triage", "detect", "analyze", "finetune", "build-testbed", "build-fixture",
                 "fetch", "bench"):
        assert name in COMMANDS and f"  {name} " in proc.stdout
    bad = memtrain("audti")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown command 'audti'" in bad.stderr


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_command_has_the_shared_groups_with_defaults(name):
    text = command(name).parser().format_help()
    config = command(name).config
    for group, flags in SHARED.items():
        if issubclass(config, group):
            assert all(flag in text for flag in flags), (name, group.__name__)
    assert issubclass(config, (ModelOptions,)) and issubclass(config, OutputOptions)
    assert "(default: " in text and "key=value" in text


@pytest.mark.parametrize("name", ("audit", "evaluate", "detect", "analyze"))
def test_shared_options_follow_one_rule(name):
    """--report_to: the same choices everywhere (tensorboard included); a bad value, one message."""
    cmd = command(name)
    required = {"audit": ["--mitigation", "none"], "analyze": ["guidance"]}.get(name, [])
    ok = parse_command_line(cmd.parser(), [*required, "--report_to", "tensorboard"], cmd.positionals, cmd.recipe)
    assert ok.config(cmd.config).report_to == "tensorboard"
    bad = parse_command_line(cmd.parser(), [*required, "--report_to", "mlflow"], cmd.positionals, cmd.recipe)
    with pytest.raises(MemtrainError, match=r"^--report_to must be one of none, wandb, tensorboard, got 'mlflow'$"):
        bad.config(cmd.config)


def test_recipe_key_override_set_and_flag_set_the_same_field(tmp_path):
    cmd = command("evaluate")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seeds: 3\nsampler: {num_inference_steps: 7}\n")
    forms = [[str(recipe)], ["seeds=3", "sampler.num_inference_steps=7"],
             ["--set", "seeds=3", "sampler.num_inference_steps=7"], ["--seeds", "3", "--sampler.num_inference_steps", "7"],
             ["--seeds", "3", "--steps", "7"]]
    configs = [parse_command_line(cmd.parser(), argv, cmd.positionals, cmd.recipe).config(cmd.config) for argv in forms]
    assert {(c.seeds, c.sampler.num_inference_steps) for c in configs} == {(3, 7)}
    # later wins: recipe < key=value < flag
    line = parse_command_line(cmd.parser(), [str(recipe), "seeds=4", "--seeds", "5"], cmd.positionals, cmd.recipe)
    assert line.config(cmd.config).seeds == 5
    with pytest.raises(MemtrainError, match=r"unknown recipe key 'seeeds' \(did you mean 'seeds'\?\)"):
        parse_command_line(cmd.parser(), ["seeeds=3"], cmd.positionals, cmd.recipe).config(cmd.config)


def _fake_testbed(root: Path) -> Path:
    """A testbed's layout (no weights: the refusal comes before anything loads)."""
    (root / "model").mkdir(parents=True)
    (root / "model" / "model_index.json").write_text("{}")
    (root / "testbed_card.json").write_text(json.dumps({}))
    (root / "manifests").mkdir()
    return root


@pytest.mark.parametrize("command_name", ("evaluate", "audit"))
def test_a_bad_model_is_refused_in_one_line(tmp_path, command_name):
    testbed = _fake_testbed(tmp_path / "tb")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0")
    extra = ["--mitigation", "none"] if command_name == "audit" else []
    for model, says in ((testbed / "manifests", "a folder without model_index.json"), (a_file, "is a file"),
                        (tmp_path / "missing", "does not exist")):
        out = tmp_path / f"out-{Path(model).name}"
        proc = memtrain(command_name, "--model", str(model), "--output_dir", str(out), *extra)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith("error: --model ") and says in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
        assert not out.exists()


def test_the_scripts_are_the_commands(tmp_path):
    """scripts/audit.py is `memtrain audit`: the same refusal from both forms."""
    script = subprocess.run([sys.executable, str(REPO / "scripts" / "audit.py"), "--mitigation", "nonsuch"],
                            capture_output=True, text=True, timeout=300)
    direct = memtrain("audit", "--mitigation", "nonsuch")
    assert script.returncode == direct.returncode == 2 and script.stderr == direct.stderr
    assert "unknown mitigation 'nonsuch'" in direct.stderr


def test_accelerate_launch_runs_the_module_and_adds_its_own_report(tmp_path):
    """`accelerate launch -m memtrain ...` (the multi-process form): the command's one-line error
    comes first; the launcher then reports the child's exit status 2 in a traceback of its own
    (what the docs tell users to expect)."""
    proc = subprocess.run(["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
                           "no", "--dynamo_backend", "no", "-m", "memtrain", "audit", "--mitigation", "nonsuch"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "unknown mitigation 'nonsuch'" in errors[0]
    assert "returned non-zero exit status 2" in proc.stderr


def test_commands_doc_is_current():
    """docs/commands.md is what tools/commands_doc.py writes from the parsers now."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "commands_doc.py"), "--check"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
