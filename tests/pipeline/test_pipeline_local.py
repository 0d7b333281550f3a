"""The operator-side facts: the synced tree and its content hash, the tarball, the dependency spec, the token."""

from __future__ import annotations

import io
import shlex
import tarfile
from pathlib import Path

from pipeline import commands, local, parse

REPO = Path(__file__).resolve().parents[2]


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel, text in {"flashcore/__init__.py": "x = 1\n", "tests/t.py": "pass\n", ".git/HEAD": "ref\n",
                      ".venv/bin/python": "", "reports/r.md": "r", "flashcore/__pycache__/a.pyc": "b",
                      "pyproject.toml": "[project]\ndependencies = [\"torch>=2.11\", \"pytest>=8\"]\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_collect_tree_excludes_and_hashes_content(tmp_path):
    root = _tree(tmp_path)
    t1 = local.collect_tree(root)
    assert t1.files == ("flashcore/__init__.py", "pyproject.toml", "tests/t.py")
    assert local.collect_tree(root).content_hash == t1.content_hash          # stable
    (root / "reports" / "new.md").write_text("ignored")
    assert local.collect_tree(root).content_hash == t1.content_hash          # excluded paths don't count
    (root / "tests" / "t.py").write_text("pass  \n")
    assert local.collect_tree(root).content_hash != t1.content_hash          # content does


def test_tarball_holds_exactly_the_tree(tmp_path):
    tree = local.collect_tree(_tree(tmp_path))
    with tarfile.open(fileobj=io.BytesIO(local.make_tarball(tree))) as tar:
        assert sorted(tar.getnames()) == list(tree.files)


def test_requirements_and_spec_hash(tmp_path):
    root = _tree(tmp_path)
    assert local.requirements(root) == ["torch>=2.11", "pytest>=8"]
    assert "pytest>=8" in local.requirements(REPO)
    h = parse.install_spec_hash(["a"], "python3", [], b"script")
    assert h == parse.install_spec_hash(["a"], "python3", [], b"script")
    assert h != parse.install_spec_hash(["a"], "/opt/py", [], b"script") != \
        parse.install_spec_hash(["a"], "python3", ["w.whl"], b"script") != \
        parse.install_spec_hash(["a"], "python3", [], b"another script")


def test_hf_token_sources(tmp_path):
    home = tmp_path / "hf"
    assert local.hf_token({"HF_HOME": str(home)}) == ("", "")
    home.mkdir()
    (home / "token").write_text("hf_cached\n")
    assert local.hf_token({"HF_HOME": str(home)}) == ("hf_cached", str(home / "token"))
    assert local.hf_token({"HF_HOME": str(home), "HF_TOKEN": "hf_env"}) == ("hf_env", "$HF_TOKEN")
    assert local.hf_token({"HF_HOME": str(home), "HUGGING_FACE_HUB_TOKEN": "hf_old"})[1] == "$HUGGING_FACE_HUB_TOKEN"


def test_git_revision_of_this_checkout():
    rev = local.git_revision(REPO)
    assert rev == "" or len(rev.split("+")[0]) == 12


def test_code_root_is_the_checkout_we_run_from(tmp_path):
    assert local.find_code_root(REPO) == REPO
    assert local.find_code_root(tmp_path) == local.REPO_ROOT          # not a checkout: the package's own
    for d in ("flashcore", "pipeline"):
        (tmp_path / d).mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    assert local.find_code_root(tmp_path) == tmp_path.resolve()


def test_git_revision_is_the_checkouts_own_never_an_outer_repositorys(tmp_path):
    import subprocess

    def git(*args, cwd):
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    outer = tmp_path / "outer"
    nested = outer / "vendor" / "flashcore-copy"
    nested.mkdir(parents=True)
    (nested / "x.py").write_text("x = 1\n")
    git("init", "-q", cwd=outer)
    git("add", ".", cwd=outer)
    git("commit", "-qm", "outer", cwd=outer)
    assert len(local.git_revision(outer)) == 12                          # the outer checkout's own commit
    assert local.git_revision(nested) == ""                              # a copy inside it: not that commit
    git("init", "-q", cwd=nested)
    git("add", ".", cwd=nested)
    git("commit", "-qm", "inner", cwd=nested)
    inner = local.git_revision(nested)
    assert len(inner) == 12 and inner != local.git_revision(outer)       # its own repository: its own commit
    (nested / "x.py").write_text("x = 2\n")
    assert local.git_revision(nested) == inner + "+dirty"


def test_what_git_ignores_is_not_synced_and_rsync_sends_the_same_files(tmp_path):
    """A checkout whose .gitignore and .git/info/exclude ignore data, wheels, a kit and logs (names with spaces
    and wildcard characters too): the tree leaves them out, keeps an untracked file git does not ignore, and a
    real rsync given the tree's patterns sends exactly the tree's files. Without a .git: today's fixed list."""
    import subprocess

    root = tmp_path / "src"
    kept = {"flashcore/a.py", "notes.txt", ".gitignore", "odd [v1]*?.py", "dir with space/keep.py", "back\\slash.py"}
    ignored = {"datasets/big.bin", "datasets/sub/more.bin", "wheels/x.whl", "kit/tool", "run.log",
               "odd [v1]*?.log", "dir with space/b.log", "back\\slash*.log", "deep/er/run.log"}
    for rel in kept | ignored:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / ".gitignore").write_text("datasets/\n*.log\n/wheels/\n")
    assert local.collect_tree(root).files == tuple(sorted(kept | ignored))        # not a checkout: all of it
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".git" / "info" / "exclude").write_text("/kit/\n")
    tree = local.collect_tree(root)
    assert tree.files == tuple(sorted(kept))
    assert {"/datasets/", "/wheels/", "/kit/", "/run.log"} <= set(tree.excludes)
    dest = tmp_path / "dest"
    argv = commands.rsync_argv(str(root), str(dest), None, tree.excludes)
    subprocess.run(argv, check=True, capture_output=True)
    sent = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert sent == sorted(kept)
    assert _rsync_through_exclude_file(tree, tmp_path / "dest2") == sorted(kept)   # what the sync step runs


def _rsync_through_exclude_file(tree, dest: Path) -> list[str]:
    """rsync as the sync step runs it: the patterns in a NUL-separated file, the command through `sh -c`."""
    from pipeline.remote import LocalRemote

    excludes = dest.parent / f"{dest.name}.excludes"
    excludes.write_bytes(commands.exclude_file_bytes(tree.excludes))
    argv = commands.rsync_argv(str(tree.root), str(dest), None, exclude_from=str(excludes))
    res = LocalRemote().run(shlex.join(argv), timeout=120)
    assert res.exit_code == 0, res.stderr
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())


def test_thousands_of_git_ignored_paths_sync_through_an_exclude_file(tmp_path):
    """4,000 ignored logs in a tracked folder (and one with a line break in its name): as `--exclude` arguments
    the command would pass the kernel's 128 KiB limit on one argument ("Argument list too long"); from a file
    (`--from0 --exclude-from`) rsync sends exactly the tree's files."""
    import subprocess

    root = tmp_path / "src"
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "keep.py").write_text("x = 1\n")
    for i in range(4000):
        (root / "logs" / f"run-{i:05d}-with-a-fairly-long-name.log").write_text("")
    (root / "logs" / "two\nlines.log").write_text("")
    (root / ".gitignore").write_text("*.log\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    tree = local.collect_tree(root)
    assert len(tree.excludes) > 4000 and tree.files == (".gitignore", "logs/keep.py")
    assert len(shlex.join(commands.rsync_argv(str(root), "/x", None, tree.excludes))) > 128 * 1024
    assert _rsync_through_exclude_file(tree, tmp_path / "dest") == [".gitignore", "logs/keep.py"]
