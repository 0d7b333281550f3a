"""The remote install script (pipeline/remote_scripts/install.py), run here the way the pipeline runs it on a
host (`python - SPEC < install.py`): a --system-site-packages venv that sees a venv host python's packages
through a .pth, a missing dependency installed offline from a wheelhouse, then the cached fast path."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline import commands, parse
from pipeline.local import REMOTE_SCRIPTS

REPO = Path(__file__).resolve().parents[2]


def _wheel(dir_: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (a real one: pip installs it)."""
    path = dir_ / f"{name}-{version}-py3-none-any.whl"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = []
    for fname, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{fname},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        for fname, text in files.items():
            z.writestr(fname, text)
    return path


def _install(spec: dict) -> dict:
    p = subprocess.run(commands.install_command(sys.executable, spec), shell=True, capture_output=True,
                       input=(REMOTE_SCRIPTS / "install.py").read_bytes(), timeout=300)
    doc = parse.parse_result_line(p.stdout.decode())
    assert doc is not None, p.stdout.decode() + p.stderr.decode()
    return doc


@pytest.mark.slow
def test_offline_wheelhouse_install_then_cached(tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(REPO / "flashcore", ws / "flashcore", ignore=shutil.ignore_patterns("__pycache__"))
    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    _wheel(wh, "fcdummy", "1.2")
    spec = {"workspace": str(ws), "venv": str(ws / ".venv"), "spec_hash": "h1", "wheelhouse": str(wh),
            "requirements": ["torch>=2", "pytest>=8", "fcdummy>=1.1"]}
    first = _install(spec)
    assert first["ok"] and not first["cached"], first
    assert first["installed"] == ["fcdummy>=1.1"]
    assert first["dist_versions"]["fcdummy"] == "1.2" and first["dist_versions"]["torch"]
    assert first["imports"]["flashcore_path"] == str(ws / "flashcore")      # from the workspace, not installed
    pth = list((ws / ".venv").rglob("_flashcore_host_site.pth"))
    assert pth and any(Path(line).is_dir() for line in pth[0].read_text().split())
    second = _install(spec)
    assert second["ok"] and second["cached"]
    assert second["seconds"] < first["seconds"]
    # offline (--no-index, a wheelhouse without it): a clear error naming what is missing
    missing = _install({**spec, "spec_hash": "h2", "requirements": ["fcnothere>=1"]})
    assert not missing["ok"] and "missing dependencies: fcnothere (missing, need fcnothere>=1)" in missing["error"]
