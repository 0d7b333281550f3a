"""Facts about the operator's machine: the code tree to sync (and its content hash), the git revision, the
dependency spec from pyproject.toml, and the HF token. Local filesystem reads only; never a connection."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.commands import SYNC_EXCLUDES, is_excluded

REPO_ROOT = Path(__file__).resolve().parent.parent
REMOTE_SCRIPTS = Path(__file__).resolve().parent / "remote_scripts"


def find_code_root(cwd: Path | None = None) -> Path:
    """The checkout to sync: the working directory when it is a flashcore checkout (run from the repository
    root, as `fab` does), else the checkout this package was loaded from."""
    here = Path.cwd() if cwd is None else cwd
    if (here / "pyproject.toml").is_file() and (here / "flashcore").is_dir() and (here / "pipeline").is_dir():
        return here.resolve()
    return REPO_ROOT


@dataclass(frozen=True)
class CodeTree:
    root: Path
    files: tuple[str, ...]           # POSIX paths relative to root, sorted
    content_hash: str                # sha256 over (path, file sha256) pairs
    total_bytes: int


def collect_tree(root: Path = REPO_ROOT, excludes=SYNC_EXCLUDES) -> CodeTree:
    files: list[str] = []
    total = 0
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        dirnames[:] = sorted(d for d in dirnames
                             if not is_excluded(f"{rel_dir}/{d}".lstrip("/"), True, excludes))
        for name in filenames:
            rel = f"{rel_dir}/{name}".lstrip("/")
            if not is_excluded(rel, False, excludes):
                files.append(rel)
    files.sort()
    for rel in files:
        p = root / rel
        data = os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        total += len(data)
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return CodeTree(root=root, files=tuple(files), content_hash=digest.hexdigest(), total_bytes=total)


def make_tarball(tree: CodeTree) -> bytes:
    """A gzipped tar of exactly `tree.files` (the SFTP fallback when either end lacks rsync)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for rel in tree.files:
            tar.add(tree.root / rel, arcname=rel, recursive=False)
    return buf.getvalue()


def git_revision(root: Path = REPO_ROOT) -> str:
    """`<sha>` or `<sha>+dirty` of the checkout at `root` itself, or '' when `root` is not the top of a git
    checkout (a copy nested inside another repository must not report that repository's commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != Path(root).resolve():
            return ""
        sha = git("rev-parse", "--short=12", "HEAD")
        if not sha:
            return ""
        return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def requirements(root: Path = REPO_ROOT) -> list[str]:
    """`[project] dependencies` of pyproject.toml: what the suite needs on the remote."""
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib
        return list(tomllib.loads(text)["project"]["dependencies"])
    except ImportError:  # Python 3.10: no tomllib; the dependency list is a plain array of strings
        block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
        return re.findall(r'"([^"]+)"', block.group(1)) if block else []


def remote_scripts() -> dict[str, bytes]:
    """The scripts the steps feed to the host's python on stdin."""
    return {p.name: p.read_bytes() for p in REMOTE_SCRIPTS.glob("*.py")}


def wheels(wheelhouse: str | None) -> tuple[tuple[str, int], ...]:
    """(path, size) of the wheelhouse's .whl files."""
    if not wheelhouse:
        return ()
    return tuple((str(p), p.stat().st_size) for p in sorted(Path(wheelhouse).expanduser().glob("*.whl")))


def hf_token(environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(token, where it came from) from HF_TOKEN / HUGGING_FACE_HUB_TOKEN / HF_TOKEN_PATH / the HF cache;
    ('', '') when there is none. The token only ever travels as bytes on a channel's stdin."""
    env = os.environ if environ is None else environ
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if env.get(var, "").strip():
            return env[var].strip(), f"${var}"
    hf_home = Path(env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    for path in (env.get("HF_TOKEN_PATH"), hf_home / "token"):
        if path and Path(path).expanduser().is_file():
            token = Path(path).expanduser().read_text().strip()
            if token:
                return token, str(path)
    return "", ""
