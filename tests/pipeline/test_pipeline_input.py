"""Bad input gets exit 2 and ONE line on stderr, before anything runs (no report folder made, no workspace, no
connection): every flag, inventories that are not UTF-8 YAML or repeat a key, known_hosts and ssh_config files
that cannot be used, model names that are neither a preset nor a hub id. Exit 1 is never used for any of it."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.settings import ssh_words

REPO = Path(__file__).resolve().parents[2]
KEY = base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(32)).decode()   # a well-formed blob


def _bad(argv: list[str], words: str, capsys, tmp_path: Path) -> str:
    report_dir = tmp_path / "never-made"
    code = cli.main([*argv, "--report-dir", str(report_dir)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err, err
    assert err.count("\n") == 1 and err.startswith("flashcore-deploy: error: ") and "Traceback" not in err
    assert not report_dir.exists()
    return err


@pytest.mark.parametrize("argv, words", [
    (["--host", "h", "--timeout", "nan"], "--timeout: 'nan' must be a finite number of seconds > 0"),
    (["--host", "h", "--timeout", "inf"], "--timeout: 'inf' must be a finite"),
    (["--host", "h", "--timeout", "0"], "--timeout: '0' must be"),
    (["--host", "h", "--timeout", "ten"], "--timeout: 'ten' is not a number of seconds"),
    (["--host", "h", "--connect-timeout", "-1"], "--connect-timeout: '-1' must be"),
    (["--host", "h", "--connect-timeout", "NaN"], "--connect-timeout: 'NaN' must be"),
    (["--host", "h", "--lock-timeout", "-5"], "--lock-timeout: '-5' must be a finite number of seconds >= 0"),
    (["--host", ""], "--host: '' is not a host name or address (use --local for this machine)"),
    (["--host", "a b"], "--host: 'a b' is not a host name"),
    (["--host", "h", "--port", "0"], "--port: 0 is not a TCP port"),
    (["--host", "h", "--port", "twenty"], "--port: 'twenty' is not a TCP port"),
    (["--host", "h", "--user", ""], "--user: empty"),
    (["--host", "h", "--workspace", "a\nb"], "--workspace: 'a\\nb' contains a NUL or line break"),
    (["--host", "h", "--model", "tinyy"], "--model: unknown model 'tinyy' (known: default, tiny, tiny-mistral, "
                                          "tiny-qwen2, llama-3.1-8b, smollm2-135m; a hub id looks like org/name"),
    (["--host", "h", "--model", "tiny,smollm2-135n"], "--model: unknown model 'smollm2-135n'"),
    (["--host", "h", "--model", "tiny,,default"], "--model: 'tiny,,default' has an empty name in its list"),
    (["--host", "h", "--model", "tiny,org//x"], "--model: 'org//x' is not a hub id"),
    (["--host", "h", "--seed", "-1"], "--seed: -1 must be at least 0"),
    (["--host", "h", "--seed", "1.5"], "--seed: '1.5' is not a whole number"),
    (["--local", "--model", "tinyy"], "--model: unknown model 'tinyy'"),
    (["--host", "h", "--model", "org//model"], "--model: 'org//model' is not a hub id"),
    (["--host", "h", "--model", "a/b/c"], "--model: 'a/b/c' is not a hub id"),
    (["--host", "h", "--model", "/models/llama"], "is not a hub id"),
    (["--host", "h", "--model", "org/na me"], "is not a hub id"),
    (["--host", "h", "--model", "org/--x"], "is not a hub id"),
    (["--host", "h", "--require-gpu", ""], "--require-gpu: GPU requirement is empty"),
    (["--host", "h", "--skip", "lock"], "--skip: 'lock' is not a step that can be skipped"),
    (["--host", "h", "--wheelhouse", "/nonexistent/wh"], "--wheelhouse /nonexistent/wh: not a directory"),
    (["--host", "h", "--identity", "/nonexistent/key"], "--identity /nonexistent/key: no such file"),
    (["--host", "h", "--known-hosts", "/nonexistent/kh"], "known_hosts /nonexistent/kh: no such file (strict"),
    (["--host", "h", "--local"], "choose one of --host, --inventory/--target, --local"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags(argv, words, capsys, tmp_path):
    _bad(argv, words, capsys, tmp_path)


def test_empty_wheelhouse(capsys, tmp_path):
    (tmp_path / "wh").mkdir()
    _bad(["--host", "h", "--wheelhouse", str(tmp_path / "wh")], "no .whl files there", capsys, tmp_path)


def _inventory(tmp_path: Path, data: bytes | str) -> Path:
    p = tmp_path / "inv.yaml"
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


@pytest.mark.parametrize("data, words", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "line 1: not UTF-8 text (byte 0x89)"),
    (b"hosts:\n  a: {address: h}\n  b: {address: \xff\xfe}\n", "line 3: not UTF-8 text (byte 0xff)"),
    ("hosts:\n  a: {address: h\x00}\n", "line 2: not valid YAML (unacceptable character #x0000"),
    ("hosts: " + "[" * 5000 + "]" * 5000 + "\n", "line 1: not valid YAML (exceeded maximum nesting depth)"),
    ("hosts:\n  a: {address: h}\nhosts:\n  b: {address: i}\n", "line 3: not valid YAML (duplicate key 'hosts' "
                                                               "(first on line 1))"),
    ("hosts:\n  a: {address: h}\n  a: {address: i}\n", "line 3: not valid YAML (duplicate key 'a' (first on line 2))"),
    ("hosts:\n  a: {address: h, port: 22, port: 23}\n", "duplicate key 'port'"),
    ("hosts:\n  a: {address: h, model: tinyy}\n", "hosts.a.model: unknown model 'tinyy'"),
    ("hosts:\n  a: {address: h, identity: /nonexistent/k}\n", "hosts.a.identity /nonexistent/k: no such readable"),
    ("hosts:\n  a: {address: h, timeouts: {suite: .nan}}\n", "hosts.a.timeouts.suite:"),
    ("", "(top level): expected a mapping with 'hosts'"),
])
def test_bad_inventory_files_name_the_file_and_line(data, words, capsys, tmp_path):
    inv = _inventory(tmp_path, data)
    err = _bad(["--inventory", str(inv), "--target", "all"], words, capsys, tmp_path)
    assert f"{inv}: " in err


def test_large_inventory_parses_fast(tmp_path):
    from pipeline.inventory import load_inventory
    n = 20000
    text = "defaults: {gpu: none, model: tiny}\nhosts:\n" + "".join(
        f"  h{i}: {{address: 10.{i // 65536}.{i // 256 % 256}.{i % 256}, port: {1024 + i % 60000}}}\n"
        for i in range(n))
    inv = _inventory(tmp_path, text)
    t0 = time.perf_counter()
    assert len(load_inventory(inv).hosts) == n
    assert time.perf_counter() - t0 < 5      # libyaml's C parser: ~1 s here (pure Python: ~10 s)


@pytest.mark.parametrize("content, words", [
    (b"hello world this is not a key\n", "line 1: not a known_hosts entry ('hello world"),
    (f"[h]:22 ssh-ed25519 {KEY}\n@revoked\n".encode(), "line 2: not a known_hosts entry"),
    (f"h ssh-rsa {KEY}\n".encode(), "line 1: not a known_hosts entry"),          # the blob says ed25519
    (b"h ssh-ed25519 !!!notbase64!!!\n", "line 1: not a known_hosts entry"),
    (b"\x00\x01\xff\xfe binary", "not a text file"),
])
def test_unusable_known_hosts_is_exit_2_naming_the_file(content, words, capsys, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_bytes(content)
    err = _bad(["--host", "h", "--known-hosts", str(kh)], words, capsys, tmp_path)
    assert f"known_hosts {kh}" in err


def test_known_hosts_that_is_a_directory(capsys, tmp_path):
    _bad(["--host", "h", "--known-hosts", str(tmp_path)], "cannot read (Is a directory)", capsys, tmp_path)


def test_every_line_openssh_accepts_is_accepted(tmp_path):
    """Hashed names, markers, comments, options we cannot use (a key type paramiko lacks) all load."""
    from paramiko import HostKeys
    from pipeline.known_hosts import load_known_hosts

    sk = base64.b64encode(b"\x00\x00\x00\x1ask-ssh-ed25519@openssh.com" + bytes(40)).decode()
    kh = tmp_path / "kh"
    kh.write_text(f"# comment\n\n|1|c2FsdHNhbHRzYWx0c2FsdHNhbHQ=|aGFzaGhhc2hoYXNoaGFzaGhhc2g= ssh-ed25519 {KEY}\n"
                  f"@cert-authority *.example.org ssh-ed25519 {KEY}\n@revoked [h]:2222 ssh-ed25519 {KEY}\n"
                  f"h,10.0.0.1 ssh-ed25519 {KEY} a comment\nh sk-ssh-ed25519@openssh.com {sk}\n")
    known = load_known_hosts((str(kh),))
    assert known.cert_authorities == 1 and len(known.revoked) == 1 and len(known.entries) == 2
    keys = HostKeys()
    known.into(keys)
    assert keys.lookup("h") is None                  # the only key listed for h is revoked: not trusted


@pytest.mark.parametrize("text, words", [
    (b"\xff\xfe\x00binary", "cannot read ssh_config"),
    (b"Host gpu\n  ProxyCommand nc %h %p\n", "uses ProxyCommand, which flashcore-deploy does not support"),
    (b"Host gpu\n  Port seventy\n", "ssh_config Port for gpu: 'seventy' is not a TCP port"),
    (b"Host gpu\n  ProxyJump a@b@c:x\n", "ProxyJump 'a@b@c:x' is not [user@]host[:port]"),
])
def test_unusable_ssh_config_is_exit_2(text, words, capsys, tmp_path):
    cfg = tmp_path / "ssh_config"
    cfg.write_bytes(text)
    _bad(["--host", "gpu", "--ssh-config", str(cfg)], words, capsys, tmp_path)


def test_ssh_words_split_like_openssh(tmp_path):
    one = tmp_path / "a b"
    one.write_text("")
    assert ssh_words('"/x y/kh" /z') == ("/x y/kh", "/z")
    assert ssh_words("/x /y") == ("/x", "/y")
    assert ssh_words("'/q r' \\\"s") == ("/q r", '"s')
    assert ssh_words(str(one)) == (str(one),)        # paramiko dropped the quotes of one path with a space


def test_version_list_hosts_and_dry_run(capsys, tmp_path):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("flashcore-deploy 0.1.0 (python ")
    inv = _inventory(tmp_path, "defaults: {gpu: none, model: tiny, port: 2222}\n"
                               "hosts:\n  a: {address: 10.0.0.1}\n  b: {address: 10.0.0.2, user: ubuntu}\n"
                               "groups: {both: [a, b]}\n")
    assert cli.main(["--inventory", str(inv), "--target", "both", "--list-hosts", "--ssh-config", "none"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("a\troot@10.0.0.1:2222\tmodel tiny\tgpu none") and out[1].startswith("b\tubuntu@10.0.0.2")
    ws = tmp_path / "ws"
    assert cli.main(["--inventory", str(inv), "--target", "a", "--dry-run", "--ssh-config", "none",
                     "--workspace", str(ws), "--report-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    for step in ("connect", "lock", "gpu", "sync", "install", "token", "suite"):
        assert f"## {step}" in out
    assert "flock -n 9" in out and "Host flashcore-target\n        HostName 10.0.0.1\n        Port 2222" in out
    assert "--parity-model tiny" in out and "< stdin: install.py" in out
    assert not ws.exists() and not (tmp_path / "r").exists()             # nothing ran, nothing written


def test_empty_inventory_strings_are_refused(capsys, tmp_path):
    inv = _inventory(tmp_path, "hosts:\n  a: {address: h, workspace: ''}\n")
    _bad(["--inventory", str(inv), "--target", "a"], "hosts.a.workspace: empty", capsys, tmp_path)


def test_model_names_are_checked_against_the_checkouts_catalogue_only_when_it_can_be_read(tmp_path):
    """An unreadable catalogue (no flashcore/ there) refuses nothing up front: the suite says what it lacks."""
    from pipeline.settings import UsageError, check_model, preset_names

    assert preset_names(tmp_path) == ()
    check_model("tiny,org/model", preset_names(tmp_path))
    known = preset_names(REPO)
    assert {"default", "tiny", "llama-3.1-8b", "smollm2-135m"} <= set(known)
    with pytest.raises(UsageError, match="unknown model 'tinyy'"):
        check_model("tinyy", known)
