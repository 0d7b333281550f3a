"""Facts about the operator's machine: the code tree to sync (and its content hash), the git revision, the
dependency spec from pyproject.toml, and the HF token. Local reads only (files, git); never a connection."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.commands import SYNC_EXCLUDES, Excludes, anchored_pattern

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
    excludes: tuple[str, ...] = SYNC_EXCLUDES   # the patterns it was collected with: rsync is given the same


def collect_tree(root: Path = REPO_ROOT, excludes: tuple[str, ...] | None = None) -> CodeTree:
    """The files to sync under `root` and their content hash. `excludes`: default SYNC_EXCLUDES and, when `root`
    is the top of a git checkout, what git ignores there (`git_ignored`): the tar path sends these files, and
    rsync is given the same patterns (`CodeTree.excludes`), so both send the same tree."""
    if excludes is None:
        excludes = SYNC_EXCLUDES + git_ignored(root)
    is_excluded = Excludes(excludes)
    files: list[str] = []
    total = 0
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        dirnames[:] = sorted(d for d in dirnames
                             if not is_excluded(f"{rel_dir}/{d}".lstrip("/"), True))
        for name in filenames:
            rel = f"{rel_dir}/{name}".lstrip("/")
            if not is_excluded(rel, False):
                files.append(rel)
    files.sort()
    for rel in files:
        p = root / rel
        data = os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        total += len(data)
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return CodeTree(root=root, files=tuple(files), content_hash=digest.hexdigest(), total_bytes=total,
                    excludes=tuple(excludes))


def make_tarball(tree: CodeTree) -> bytes:
    """A gzipped tar of exactly `tree.files` (the SFTP fallback when either end lacks rsync)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for rel in tree.files:
            tar.add(tree.root / rel, arcname=rel, recursive=False)
    return buf.getvalue()


def _git(root: Path, *args: str) -> str | None:
    """git's stdout in the checkout whose top is `root` itself; None when `root` is not the top of a git checkout
    (a copy nested inside another repository must not take that repository's facts) or git is missing."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10).stdout
    try:
        top = git("rev-parse", "--show-toplevel").strip()
        if not top or Path(top).resolve() != Path(root).resolve():
            return None
        return git(*args)
    except (OSError, subprocess.SubprocessError):
        return None


def git_revision(root: Path = REPO_ROOT) -> str:
    """`<sha>` or `<sha>+dirty` of the checkout at `root` itself, or '' when `root` is not the top of a git
    checkout (a copy nested inside another repository must not report that repository's commit)."""
    sha = (_git(root, "rev-parse", "--short=12", "HEAD") or "").strip()
    if not sha:
        return ""
    return sha + ("+dirty" if (_git(root, "status", "--porcelain", "--untracked-files=no") or "").strip() else "")


def git_ignored(root: Path = REPO_ROOT) -> tuple[str, ...]:
    """What git ignores in the checkout at `root` (its .gitignore files, .git/info/exclude, core.excludesFile;
    tracked files never), as anchored exclude patterns, a wholly ignored folder as one; () when `root` is not the
    top of a git checkout. The datasets, wheel folders and kits a user keeps there are not sent to every host."""
    out = _git(root, "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory")
    return tuple(anchored_pattern(p) for p in sorted((out or "").split("\0")) if p)


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
