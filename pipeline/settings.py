"""One place resolves a host's settings, once, before anything runs:

    built-in defaults (HostConfig's field defaults)  ->  inventory (defaults:, then the host)
        ->  ~/.ssh/config (HostName, User, Port, IdentityFile, ProxyJump, UserKnownHostsFile)  ->  flags

Later layers win where they say something; a layer that says nothing leaves the value alone. That is Fabric's own
order (its config files < ssh_config < explicit arguments): the inventory plays Fabric's config, the flags its
arguments. Everything the user gave is checked here (flags, inventory, ssh_config, known_hosts, key files, the
model name): a bad value is a `UsageError`, exit 2 with one line naming the flag, file or field.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.catalogue import DEFAULT as DEFAULT_MODELS
from pipeline.catalogue import read_catalogue
from pipeline.errors import UsageError
from pipeline.inventory import (GpuSpec, Inventory, describe_gpu_requirement, load_inventory,
                                parse_gpu_requirement, parse_target_file, select_targets)
from pipeline.known_hosts import load_known_hosts
from pipeline.results import SKIPPABLE_STEPS

DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")   # OpenSSH's user + global files
DEFAULT_SSH_CONFIG = ("~/.ssh/config", "/etc/ssh/ssh_config")              # user first: its values win
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


@dataclass(frozen=True)
class Hop:
    """One ProxyJump hop, resolved (its own ssh_config entry applied)."""

    address: str
    port: int = 22
    user: str = "root"
    identities: tuple[str, ...] = ()

    def spec(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.user}@{host}:{self.port}"


@dataclass(frozen=True)
class HostConfig:
    """One host, every setting resolved. The field defaults ARE the built-in defaults (stated here only)."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    identities: tuple[str, ...] = ()               # empty: your SSH agent and default keys
    known_hosts: tuple[str, ...] = DEFAULT_KNOWN_HOSTS
    known_hosts_given: bool = False                # an explicit file must exist (strict) unless accept-new
    accept_new_host_key: bool = False
    jumps: tuple[Hop, ...] = ()                    # ProxyJump, outermost first
    python: str = "python3"
    workspace: str = "~/flashcore-workspace"
    gpu: GpuSpec | None = field(default_factory=lambda: GpuSpec(name="H100"))
    model: str = DEFAULT_MODELS                    # the suite's default list (GPU: llama-3.1-8b + smollm2-135m), or a,b
    model_explicit: bool = False                   # False: a host without a GPU falls back to the tiny preset
    seed: int | None = None                        # the suite's --parity-seed (None: its own default, 0)
    connect_timeout: float = 10.0
    install_timeout: float = 900.0
    suite_timeout: float = 1800.0
    lock_timeout: float = 300.0                    # how long to wait for another run's workspace lock
    host_timeout: float | None = None              # a fleet host's wall limit (None: steps.host_deadline)
    gpus: tuple[int, ...] | None = None            # the GPUs to validate, by nvidia-smi index (None: all)
    env: Mapping[str, str] = field(default_factory=dict)
    local: bool = False

    @property
    def label(self) -> str:
        return "local" if self.local else f"{self.address}:{self.port}"


DEFAULTS = HostConfig(name="", address="")
DEFAULT_PARALLEL = 8                               # hosts validated at once


@dataclass
class Flags:
    """What the user said (None: not said): flashcore-deploy's command line, or the fab task's arguments."""

    host: str | None = None
    port: int | None = None
    user: str | None = None
    identity: str | None = None
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    ssh_config: str | None = None       # None: ~/.ssh/config (+ /etc/ssh/ssh_config); "none": read none
    jumps: tuple[Hop, ...] | None = None  # fab: the Connection's gateway chain
    inventory: str | None = None
    target: str | None = None
    local: bool = False
    model: str | None = None
    seed: int | None = None
    require_gpu: str | None = None
    python: str | None = None
    workspace: str | None = None
    wheelhouse: str | None = None
    skip: tuple[str, ...] = ()
    timeout: float | None = None
    connect_timeout: float | None = None
    lock_timeout: float | None = None
    host_timeout: float | None = None
    gpus: tuple[int, ...] | None = None
    parallel: int | None = None         # hosts validated at once (None: DEFAULT_PARALLEL)
    history: str | None = None          # the history file (None: the inventory's history:, else beside the reports)
    report_dir: str = "reports"
    template: str | None = None
    debug: bool = False
    dry_run: bool = False
    list_hosts: bool = False
    suite_command: str | None = None    # testing aid (hidden flag): replaces the pytest invocation


# ------------------------------------------------------------------------------------------- value checks


def seconds(text: Any, what: str = "value", allow_zero: bool = False) -> float:
    """A finite, positive number of seconds (nan, inf, -1 and 0 are refused; 0 too unless `allow_zero`)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: {text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{what}: {text!r} must be a finite number of seconds {'>= 0' if allow_zero else '> 0'}")
    return value


def tcp_port(text: Any, what: str = "--port") -> int:
    try:
        value = int(str(text), 10)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a TCP port") from None
    if not 1 <= value <= 65535:
        raise UsageError(f"{what}: {value} is not a TCP port (1-65535)")
    return value


def gpu_indices(text: Any, what: str = "--gpus") -> tuple[int, ...]:
    """`0,2` -> (0, 2): nvidia-smi indices, each once."""
    words = [w.strip() for w in str(text).split(",")]
    if not all(w.isdigit() for w in words):
        raise UsageError(f"{what}: {text!r} is not a list of GPU indices like 0,2")
    return tuple(dict.fromkeys(int(w) for w in words))


def count(text: Any, what: str, least: int = 1) -> int:
    """A whole number >= `least` (a count; 0 for the suite's --seed)."""
    try:
        value = int(str(text), 10)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a whole number") from None
    if value < least:
        raise UsageError(f"{what}: {value} must be at least {least}")
    return value


def _text(value: str | None, what: str) -> None:
    if value is None:
        return
    if not value.strip():
        raise UsageError(f"{what}: empty")
    if any(c in value for c in "\0\n\r"):
        raise UsageError(f"{what}: {value!r} contains a NUL or line break")


def preset_names(code_root: Path) -> tuple[str, ...]:
    """Every model name the synced checkout's suite takes besides hub ids (`default`, its presets and packaged
    models), read from its source (pipeline.catalogue: no torch import here)."""
    return read_catalogue(code_root).names()


def check_model(model: str, presets: tuple[str, ...], what: str = "--model") -> None:
    """A model or a comma-separated list of them: each `default`, a preset or packaged model, or a hub id
    `org/name` (the rule flashcore.models.load_model applies)."""
    names = [n.strip() for n in model.split(",")]
    if not all(names):
        raise UsageError(f"{what}: {model!r} has an empty name in its list (a,b)")
    for name in names:
        if "/" in name:
            if not _HUB_ID.match(name) or ".." in name or "--" in name:
                raise UsageError(f"{what}: {name!r} is not a hub id (org/name: letters, digits, '-', '_', '.')")
        elif presets and name not in presets:
            raise UsageError(f"{what}: unknown model {name!r} (known: {', '.join(presets)}; a hub id looks like "
                             "org/name; several: a,b)")


def check_flags(f: Flags) -> None:
    """The flags on their own, before any file is read."""
    chosen = [f.host is not None, bool(f.inventory or f.target), f.local]
    if sum(chosen) > 1:
        raise UsageError("choose one of --host, --inventory/--target, --local")
    if f.host is not None and (not f.host.strip() or any(c.isspace() for c in f.host)):
        raise UsageError(f"--host: {f.host!r} is not a host name or address (use --local for this machine)")
    for what, value in (("--user", f.user), ("--python", f.python), ("--workspace", f.workspace),
                        ("--identity", f.identity), ("--known-hosts", f.known_hosts), ("--target", f.target),
                        ("--report-dir", f.report_dir), ("--model", f.model), ("--history", f.history)):
        _text(value, what)
    for step in f.skip:
        if step not in SKIPPABLE_STEPS:
            raise UsageError(f"--skip: {step!r} is not a step that can be skipped ({', '.join(SKIPPABLE_STEPS)})")
    if f.require_gpu is not None:
        _gpu(f.require_gpu, "--require-gpu")
    if f.identity is not None and not Path(f.identity).expanduser().is_file():
        raise UsageError(f"--identity {f.identity}: no such file")
    if f.wheelhouse is not None:
        wh = Path(f.wheelhouse).expanduser()
        if not wh.is_dir():
            raise UsageError(f"--wheelhouse {f.wheelhouse}: not a directory")
        if not any(wh.glob("*.whl")):
            raise UsageError(f"--wheelhouse {f.wheelhouse}: no .whl files there")


def _gpu(value: Any, what: str) -> GpuSpec | None:
    try:
        return parse_gpu_requirement(value)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None


# ------------------------------------------------------------------------------------------------ layers


def _inventory_layer(inv: Inventory, name: str) -> dict[str, Any]:
    host, d = inv.hosts[name], inv.defaults
    out: dict[str, Any] = {}
    for settings in (d, host):                      # the host's own entry over the inventory's defaults
        t = settings.timeouts
        out.update({k: v for k, v in {
            "user": settings.user, "port": settings.port, "python": settings.python,
            "workspace": settings.workspace, "gpu": settings.gpu, "model": settings.model,
            "identities": (settings.identity,) if settings.identity else None,
            "known_hosts": (settings.known_hosts,) if settings.known_hosts else None,
            "connect_timeout": t and t.connect, "install_timeout": t and t.install,
            "suite_timeout": t and t.suite, "lock_timeout": t and t.lock, "host_timeout": t and t.host,
            "gpus": tuple(settings.gpus) if settings.gpus is not None else None,
        }.items() if v is not None})
    out["address"] = host.address
    out["env"] = {**(d.env or {}), **(host.env or {})}
    return out


_LOCAL_FLAGS = ("python", "workspace", "gpu", "model", "seed", "suite_timeout", "lock_timeout", "gpus")


def _flag_layer(f: Flags) -> dict[str, Any]:
    """The flags as HostConfig fields (--host is not among them: it is the name ssh_config is asked about)."""
    return {k: v for k, v in {
        "port": f.port, "user": f.user, "python": f.python, "workspace": f.workspace,
        "gpu": f.require_gpu, "model": f.model, "seed": f.seed, "identities": (f.identity,) if f.identity else None,
        "known_hosts": (f.known_hosts,) if f.known_hosts else None, "jumps": f.jumps,
        "connect_timeout": f.connect_timeout, "suite_timeout": f.timeout, "lock_timeout": f.lock_timeout,
        "host_timeout": f.host_timeout, "gpus": f.gpus, "accept_new_host_key": f.accept_new_host_key or None,
    }.items() if v is not None}


def load_ssh_config(path: str | None):
    """paramiko's SSHConfig of `path` (or ~/.ssh/config then /etc/ssh/ssh_config), or None ("none")."""
    import paramiko

    if path == "none":
        return None
    files = [path] if path else [p for p in DEFAULT_SSH_CONFIG if Path(p).expanduser().is_file()]
    config = paramiko.SSHConfig()
    for name in files:
        try:
            with open(Path(name).expanduser(), encoding="utf-8") as fh:
                config.parse(fh)
        except (OSError, UnicodeDecodeError, paramiko.ssh_exception.ConfigParseError) as e:
            why = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise UsageError(f"{'--ssh-config ' if path else ''}{name}: cannot read ssh_config ({why})") from None
    return config


def _ssh_lookup(config, alias: str, where: str) -> dict[str, Any]:
    """The ssh_config entries for `alias` that flashcore-deploy honours, as HostConfig fields."""
    if config is None:
        return {}
    try:
        found = config.lookup(alias)
    except Exception as e:  # noqa: BLE001 - paramiko raises assorted errors on odd Match/token lines
        raise UsageError(f"{where}: ssh_config for {alias}: {e}") from None
    if "proxycommand" in found and found["proxycommand"].lower() != "none":
        raise UsageError(f"{where}: ssh_config for {alias} uses ProxyCommand, which flashcore-deploy does not "
                         "support (use ProxyJump)")
    out: dict[str, Any] = {}
    if found.get("hostname") and found["hostname"] != alias:
        out["address"] = found["hostname"]
    if "user" in found:
        out["user"] = found["user"]
    if "port" in found:
        out["port"] = tcp_port(found["port"], f"ssh_config Port for {alias}")
    keys = tuple(k for k in found.get("identityfile", []) if Path(k).expanduser().is_file())
    if keys:                                   # OpenSSH skips configured keys that do not exist; so do we
        out["identities"] = keys
    if "userknownhostsfile" in found:
        out["known_hosts"] = ssh_words(found["userknownhostsfile"])
    jump = found.get("proxyjump", "")
    if jump and jump.lower() != "none":
        out["jumps"] = tuple(_hop(config, spec.strip(), where) for spec in jump.split(","))
    return out


def ssh_words(value: str) -> tuple[str, ...]:
    """An ssh_config value that may list several paths, split as OpenSSH does (double or single quotes, and
    backslash escapes). paramiko hands a value that was ONE quoted word back without its quotes: a value that
    names an existing file as a whole is that one file."""
    if Path(value).expanduser().exists():
        return (value,)
    words, word, quote, i, started = [], "", "", 0, False
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in "\\\"' ":
            word, i, started = word + value[i + 1], i + 2, True
            continue
        if quote:
            if c == quote:
                quote = ""
            else:
                word += c
        elif c in "\"'":
            quote, started = c, True
        elif c.isspace():
            if started:
                words.append(word)
            word, started = "", False
        else:
            word, started = word + c, True
        i += 1
    if quote:
        raise UsageError(f"ssh_config: unbalanced quotes in {value!r}")
    if started:
        words.append(word)
    return tuple(words)


def _hop(config, spec: str, where: str) -> Hop:
    """`[user@]host[:port]` of a ProxyJump list, with the hop's own ssh_config entry beneath what it says."""
    m = re.match(r"^(?:(?P<user>[^@]+)@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]+))(?::(?P<port>\d+))?$", spec)
    if not m:
        raise UsageError(f"{where}: ProxyJump {spec!r} is not [user@]host[:port]")
    alias = m["v6"] or m["host"]
    own = _ssh_lookup(config, alias, where)
    own.pop("jumps", None)                     # a hop's own ProxyJump would nest chains: not followed
    return Hop(address=own.get("address", alias),
               port=tcp_port(m["port"], f"ProxyJump {spec}") if m["port"] else own.get("port", 22),
               user=m["user"] or own.get("user", DEFAULTS.user), identities=own.get("identities", ()))


def target_names(target: str | None) -> list[str | None]:
    """`--target NAME` -> [NAME]; `--target @FILE` -> the names the file lists (a summary's rerun file: one
    host or group per line, `#` comments)."""
    if not target or not target.startswith("@"):
        return [target]
    path = Path(target[1:]).expanduser()
    try:
        names = parse_target_file(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--target {target}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not names:
        raise UsageError(f"--target {target}: lists no host")
    return list(names)


def _merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    return merged


def _build(name: str, merged: dict[str, Any], presets: tuple[str, ...], where: str) -> HostConfig:
    kw = dict(merged)
    for key in ("user", "python", "workspace"):
        _text(kw.get(key), f"{where}{key}" if where else f"--{key}")
    check_model(kw.get("model", DEFAULTS.model), presets, f"{where}model")
    gpu = kw.pop("gpu", DEFAULTS.gpu)
    kh = kw.pop("known_hosts", None)
    keys = kw.pop("identities", ())
    return HostConfig(
        name=name, **kw, model_explicit="model" in kw,
        gpu=gpu if isinstance(gpu, GpuSpec) or gpu is None else _gpu(gpu, f"{where}gpu"),
        identities=tuple(os.path.expanduser(p) for p in keys),
        known_hosts=tuple(os.path.expanduser(p) for p in (kh or DEFAULT_KNOWN_HOSTS)),
        known_hosts_given=kh is not None)


def _check_files(cfg: HostConfig, where: str) -> None:
    """Key files and known_hosts files, before anything connects (they are the user's input too)."""
    for key in cfg.identities:
        if not Path(key).is_file() or not os.access(key, os.R_OK):
            raise UsageError(f"{where}identity {key}: no such readable file")
    if cfg.local:
        return
    if cfg.known_hosts_given and not cfg.accept_new_host_key and not any(Path(p).exists() for p in cfg.known_hosts):
        raise UsageError(f"{where}known_hosts {cfg.known_hosts[0]}: no such file (strict host-key checking needs "
                         "it; --accept-new-host-key creates it)")
    load_known_hosts(cfg.known_hosts)       # garbage or unreadable: UsageError naming the file and line


def fabric_layer(conn) -> dict[str, Any]:
    """What a Fabric Connection (`fab -H ...`) already resolved (its ssh_config applied: HostName, User, Port,
    IdentityFile, ProxyJump or a configured gateway), as HostConfig fields: the layer that stands in for
    ssh_config on the fab path."""
    found = conn.ssh_config or {}
    keys = conn.connect_kwargs.get("key_filename") or ()
    layer: dict[str, Any] = {"address": conn.host, "port": int(conn.port), "user": conn.user,
                             "identities": tuple(k for k in ([keys] if isinstance(keys, str) else keys)
                                                 if Path(k).expanduser().is_file()) or None}
    if "userknownhostsfile" in found:
        layer["known_hosts"] = ssh_words(found["userknownhostsfile"])
    if "proxyjump" in found and found["proxyjump"].lower() != "none":     # in OpenSSH's order (first hop first)
        layer["jumps"] = tuple(_hop(conn.config.base_ssh_config, x.strip(), "fab -H")
                               for x in found["proxyjump"].split(","))
    elif isinstance(conn.gateway, str):
        raise UsageError(f"fab -H {conn.original_host}: a ProxyCommand gateway is not supported (use ProxyJump)")
    elif conn.gateway:                                                     # a Connection from Fabric's config
        hops, gw = [], conn.gateway
        while gw:
            gw_keys = gw.connect_kwargs.get("key_filename") or ()
            hops.append(Hop(gw.host, int(gw.port), gw.user,
                            tuple([gw_keys] if isinstance(gw_keys, str) else gw_keys)))
            gw = gw.gateway
        layer["jumps"] = tuple(reversed(hops))
    return layer


def layered(f: Flags, inv: Inventory | None, ssh_config, presets: tuple[str, ...] = (),
            base: dict[str, Any] | None = None) -> list[tuple[HostConfig, str]]:
    """The layering alone (pure): (HostConfig, where its settings came from, for error messages) per target."""
    flags = _flag_layer(f)
    if f.local or (f.host is None and inv is None):                        # this machine, no SSH
        local = {"address": "localhost", "port": 0, "user": os.environ.get("USER", "local"),
                 "python": sys.executable, "gpu": "none", "local": True}
        return [(_build("local", _merge(local, {k: v for k, v in flags.items() if k in _LOCAL_FLAGS}), presets, ""),
                 "")]
    if f.host is not None:
        found = base if base is not None else _ssh_lookup(ssh_config, f.host, "--host")
        merged = _merge({"address": f.host}, found, flags)
        name = f.host if f.port in (None, 22) else f"{f.host}:{f.port}"      # --host NAME [--port P]
        return [(_build(name, merged, presets, ""), "")]
    out = []
    for name in select_targets(inv, target_names(f.target)):
        layer = _inventory_layer(inv, name)
        where = f"{f.inventory}: hosts.{name}."
        out.append((_build(name, _merge(layer, _ssh_lookup(ssh_config, layer["address"], where), flags), presets,
                           where), where))
    return out


def take_inventory_history(f: Flags, inv: Inventory) -> None:
    """The inventory's `history:` becomes the run's history file unless --history names one (cli.history_path)."""
    if inv.history and not f.history:
        f.history = inv.history


def resolve(f: Flags, code_root: Path, base: dict[str, Any] | None = None) -> list[HostConfig]:
    """Every target host's HostConfig, or a UsageError: the flags checked, the inventory, ssh_config, key and
    known_hosts files read and checked; nothing connects. `base`: a layer that stands in for ssh_config (fab's
    `fabric_layer`)."""
    check_flags(f)
    presets = preset_names(code_root)
    if f.model is not None:
        check_model(f.model, presets)
    remote = not f.local and (f.host is not None or f.inventory or f.target)
    if remote and f.host is None and not f.inventory:
        f.inventory = "inventory.yaml"
    inv = load_inventory(f.inventory) if remote and f.host is None else None
    if inv is not None:
        take_inventory_history(f, inv)
    ssh_config = load_ssh_config(f.ssh_config) if remote and base is None else None
    hosts = layered(f, inv, ssh_config, presets, base)
    for cfg, where in hosts:
        _check_files(cfg, where)
    return [cfg for cfg, _ in hosts]


def describe(cfg: HostConfig) -> str:
    """One line for --list-hosts: what a target selects, every resolved setting that decides where it goes."""
    if cfg.local:
        where = "this machine, no SSH"
    else:
        where = f"{cfg.user}@{cfg.address}:{cfg.port}"
        if cfg.jumps:
            where += " via " + ", ".join(h.spec() for h in cfg.jumps)
    gpus = f" (GPUs {','.join(map(str, cfg.gpus))})" if cfg.gpus is not None else ""
    seed = f" seed {cfg.seed}" if cfg.seed is not None else ""
    return (f"{cfg.name}\t{where}\tmodel {cfg.model}{seed}\tgpu {describe_gpu_requirement(cfg.gpu)}{gpus}\t"
            f"python {cfg.python}\tworkspace {cfg.workspace}")

