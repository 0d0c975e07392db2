"""memtrain as a user installs it: the wheel, in a fresh virtual environment, run from a directory
that is not the repository. Its default recipes must come from inside the package (no
`parents[N]` of a module path), and the `memtrain` console script must list every command.

The environment sees the machine's packages (`--system-site-packages`, no network here) but gets
its own memtrain from the wheel; the test checks that the one imported is the wheel's.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest
from accelerate import init_empty_weights

from memtrain.commands import COMMANDS
from memtrain.testbed.full_size import sd_modules

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding memtrain's wheel (built from this checkout); returns its bin/ folder."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((root / "dist").glob("memtrain-*.whl"))
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(root / "env")
    bin_dir = root / "env" / "bin"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return bin_dir


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "memtrain"), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_the_wheel_runs_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(installed / "python"), "-c", "import memtrain; print(memtrain.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, check=True).stdout.strip()
    assert where.startswith(str(installed.parent)), where  # the wheel's copy, not the checkout
    listing = _run(installed, "--help", cwd=elsewhere)
    assert listing.returncode == 0 and all(f"  {name} " in listing.stdout for name in COMMANDS)
    # a tiny real command that needs a packaged recipe (audit_sd14.yaml) and plans SD v1.4's memory
    model = tmp_path / "sd14"
    with init_empty_weights():
        unet, text, vae = sd_modules("sd14", resolution=512)
    unet.save_config(model / "unet")
    vae.save_config(model / "vae")
    text.config.save_pretrained(model / "text_encoder")
    (model / "model_index.json").write_text("{}")
    plan = _run(installed, "audit", "--model", str(model), "--mitigation", "none", "--plan", "--dtype", "fp16",
                "--max_memory", "80GB", cwd=elsewhere)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "estimated peak" in plan.stdout and "fp16, 512 px" in plan.stdout
    assert list(elsewhere.iterdir()) == []  # --plan writes nothing


def test_no_module_finds_files_through_its_own_path():
    """`Path(__file__).parents[N]` breaks in a wheel (site-packages has no recipes/ beside it)."""
    offenders = [f"{module.relative_to(REPO)}:{number}"
                 for module in (REPO / "memtrain").rglob("*.py")
                 for number, line in enumerate(module.read_text().splitlines(), 1)
                 if "__file__" in line and ("parents[" in line or ".parent.parent" in line)]
    assert offenders == []
