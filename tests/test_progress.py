"""Long stages are never silent: a stage shows a bar the inner loops annotate (the attack's steps,
the sampler's images), ends with one summary line naming its wall time, and says nothing at all
under --no_progress. Real components: a config-built bundle, the real attack and sampler."""

from __future__ import annotations

import logging
import re

import torch

from memtrain.attack import AttackConfig, attack
from memtrain.core import progress
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.core.text import encode_prompts
from factories import tiny_bundle  # noqa: E402
from test_audit import _run_script, _script_args, tiny_testbed  # noqa: F401 (a fixture)


def test_a_stage_logs_its_summary_with_the_wall_time(caplog):
    with caplog.at_level(logging.INFO, logger="memtrain"):
        with progress.stage("audit: nemo: targets", total=3, unit="targets") as bar:
            bar.advance(2)
            bar.advance()
            progress.note("attack step 1/2")
            assert bar.bar.postfix == "attack step 1/2" and bar.bar.n == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "memtrain"]
    assert len(lines) == 1 and lines[0].startswith("audit: nemo: targets: 3 targets in ") and lines[0].endswith(" s")


def test_a_quiet_stage_shows_and_logs_nothing(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="memtrain"):
        with progress.stage("detect: wen", total=2, unit="prompts", enabled=False) as bar:
            bar.advance(2)
            progress.note("sampled 2/2 images")  # no bar: a no-op
    assert bar.done == 2 and bar.bar is None
    assert not [r for r in caplog.records if r.name == "memtrain"] and capsys.readouterr().err == ""


def test_the_attack_and_the_sampler_annotate_the_open_stage(tokenizer):
    bundle = tiny_bundle(None, tokenizer=tokenizer)
    torch.manual_seed(0)
    latents = torch.randn(1, bundle.latent_channels, bundle.sample_size, bundle.sample_size)
    with progress.stage("audit: none: prompts and attack", total=1) as bar:
        attack(bundle, latents, ["a photo"], AttackConfig(steps=3, noise_samples=1, lr=0.01))
        assert bar.bar.postfix == "attack step 3/3"
        cond = encode_prompts(bundle, ["a photo", "a cat"]).embeddings
        sample(bundle, cond, [0], SamplerSettings(num_inference_steps=2, batch_size=1))
        assert bar.bar.postfix == "sampled 2/2 images"


def test_the_audit_names_every_stage_with_its_wall_time(tiny_testbed, tmp_path):
    """`memtrain audit` with progress on: each stage ends with its summary line on stderr."""
    args = [a for a in _script_args(tiny_testbed, tmp_path / "audit", "none") if a != "--no_progress"]
    proc = _run_script(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("preparing none", "the unmitigated model on the memorized prompts",
                 "none: prompts and attack (embedding)", "none: held-out control (embedding)"):
        assert re.search(rf"audit: {re.escape(name)}: \d+ \w+ in \d+ s", proc.stderr), name
