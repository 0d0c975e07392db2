"""Which code produced a result: memtrain's version and, in a git checkout, the commit and a
digest of uncommitted changes to the package (so a resumed run refuses code that changed)."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import memtrain

PACKAGE_DIR = Path(memtrain.__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """{"memtrain": version, "commit": sha or None, "changes": digest of `git diff HEAD` of the
    package or None when clean}. Outside a git checkout (an installed wheel) only the version."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"memtrain": memtrain.__version__, "commit": None, "changes": None}
    diff = _git("diff", "HEAD", "--", str(PACKAGE_DIR)) or ""
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", str(PACKAGE_DIR)) or ""
    digest = hashlib.sha256()
    digest.update(diff.encode())
    for name in sorted(untracked.split()):
        path = PACKAGE_DIR.parent / name
        if path.is_file() and path.suffix == ".py":
            digest.update(name.encode() + path.read_bytes())
    changed = bool(diff.strip()) or any(n.endswith(".py") for n in untracked.split())
    return {"memtrain": memtrain.__version__, "commit": commit.strip(), "changes": digest.hexdigest()[:16] if changed else None}
