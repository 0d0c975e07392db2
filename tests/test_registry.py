"""One registry style (memtrain.core.registry): unknown names are one line with a suggestion, lazy
entries import on lookup only, and a testbed-codec model folder loads in a process that never
imported memtrain.testbed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from factories import tiny_bundle
from memtrain.core.errors import MemtrainError
from memtrain.core.registry import Registry
from memtrain.eval.detect import DETECTORS
from memtrain.metrics.sscd import MetricBackendError, get_descriptor
from memtrain.mitigations import get_mitigation

REPO = Path(__file__).resolve().parents[1]


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_register_by_decorator_and_by_name_and_unknown_names():
    widgets = Registry("widget", key=lambda obj: obj.name)

    @widgets.register
    class Alpha:
        name = "Alpha"

    @widgets.register("beta-two")
    def beta():
        return 2

    widgets.add("gamma", 3)
    assert widgets["alpha"] is Alpha and widgets["BETA_TWO"] is beta and widgets["gamma"] == 3
    assert list(widgets) == ["alpha", "beta_two", "gamma"] and "Beta-Two" in widgets and "delta" not in widgets
    with pytest.raises(ValueError, match="already registered"):
        widgets.add("gamma", 4)
    with pytest.raises(MemtrainError) as err:
        widgets["alpah"]
    assert _one_line(err) == "unknown widget 'alpah': choose one of alpha, beta_two, gamma (did you mean 'alpha'?)"
    with pytest.raises(MemtrainError) as err:
        widgets["zzz"]
    assert "did you mean" not in _one_line(err)


def test_the_library_registries_say_what_they_hold():
    with pytest.raises(MemtrainError) as err:
        get_mitigation("nemoo")
    assert _one_line(err).startswith("unknown mitigation 'nemoo': choose one of ") and "(did you mean 'nemo'?)" in str(err.value)
    with pytest.raises(MemtrainError) as err:
        DETECTORS["wen_all_step"]
    assert "unknown detector 'wen_all_step': choose one of wen, nemo" in _one_line(err)
    assert "(did you mean 'wen_all_steps'?)" in str(err.value)
    with pytest.raises(MetricBackendError) as err:
        get_descriptor("onxx")
    assert "unknown SSCD descriptor 'onxx'" in _one_line(err) and "(did you mean 'onnx'?)" in str(err.value)


def test_lazy_entries_import_on_lookup_only(tmp_path, monkeypatch):
    (tmp_path / "registry_probe_module.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    things = Registry("thing")
    things.lazy("answer", "registry_probe_module:VALUE")
    things.lazy("broken", "registry_probe_module:MISSING")
    assert "answer" in things and list(things) == ["answer", "broken"] and not things.is_loaded("answer")
    assert "registry_probe_module" not in sys.modules
    assert things["answer"] == 42 and things.is_loaded("answer")
    assert "registry_probe_module" in sys.modules
    with pytest.raises(MemtrainError) as err:
        things["broken"]
    assert "registry_probe_module:MISSING" in _one_line(err)
    with pytest.raises(ValueError, match="module:attribute"):
        things.lazy("bad", "no_colon")
    monkeypatch.delitem(sys.modules, "registry_probe_module")


def test_testbed_codec_folder_loads_without_importing_the_testbed(tokenizer, tmp_path):
    folder = tmp_path / "model"
    tiny_bundle(None, tokenizer=tokenizer).save(folder)
    check = (
        "import sys\n"
        "from memtrain.core.bundle import CODECS, codec_class, load_bundle\n"
        "assert not any(m.startswith('memtrain.testbed') for m in sys.modules), 'imported early'\n"
        "assert not CODECS.is_loaded('PixelShuffleCodec')\n"
        f"bundle = load_bundle({str(folder)!r})\n"
        "assert type(bundle.vae) is codec_class('PixelShuffleCodec')\n"
        "print(type(bundle.vae).__module__, type(bundle.vae).__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["memtrain.testbed.codec", "PixelShuffleCodec"]
