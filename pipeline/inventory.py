"""inventory.yaml: defaults, hosts and groups (pydantic), resolved into one `HostConfig` per target host.

    defaults: {user: root, known_hosts: ~/.ssh/known_hosts, gpu: H100, model: llama-3.1-8b}
    hosts:
      runpod-a: {address: 203.0.113.7, port: 22022, identity: ~/.ssh/runpod, python: /opt/conda/bin/python}
      lab-b: {address: gpu-b.example.org}
    groups:
      nightly: [runpod-a, lab-b]

Unknown keys and bad values are rejected with the file, the field and why (`InventoryError`, exit 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import InventoryError, UsageError

DEFAULT_WORKSPACE = "~/flashcore-workspace"
DEFAULT_MODEL = "llama-3.1-8b"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_SUITE_TIMEOUT = 1800.0
DEFAULT_INSTALL_TIMEOUT = 900.0
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL", re.IGNORECASE)
_CC = re.compile(r"^\d+\.\d+$")


class GpuSpec(BaseModel):
    """What a host's GPUs must satisfy. `name` is a case-insensitive substring of nvidia-smi's name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None
    compute_capability: str | None = Field(None, description="minimum, e.g. '9.0'")
    min_count: int = Field(1, ge=1)
    min_memory_gb: float | None = Field(None, gt=0)

    @field_validator("compute_capability", mode="before")
    @classmethod
    def _cc(cls, v: Any) -> Any:
        if v is None:
            return v
        v = str(v)
        if not _CC.match(v):
            raise ValueError(f"compute capability must look like '9.0', got {v!r}")
        return v


def parse_gpu_requirement(value: Any) -> GpuSpec | None:
    """`none` -> None (no GPU needed: the suite runs on the CPU); `any` -> any one GPU; `H100` -> a name
    pattern; a mapping -> a full GpuSpec."""
    if value is None:
        return GpuSpec()
    if isinstance(value, GpuSpec):
        return value
    if isinstance(value, dict):
        return GpuSpec(**value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("GPU requirement is empty (use H100, any or none)")
        if text.lower() == "none":
            return None
        if text.lower() == "any":
            return GpuSpec()
        return GpuSpec(name=text)
    raise ValueError(f"GPU requirement must be a name (H100), 'any', 'none' or a mapping, got {value!r}")


def describe_gpu_requirement(spec: GpuSpec | None) -> str:
    if spec is None:
        return "none"
    parts = [spec.name or "any GPU"]
    if spec.compute_capability:
        parts.append(f"cc >= {spec.compute_capability}")
    if spec.min_count > 1:
        parts.append(f"x{spec.min_count}")
    if spec.min_memory_gb:
        parts.append(f">= {spec.min_memory_gb:g} GB")
    return ", ".join(parts)


class Timeouts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    connect: float | None = Field(None, gt=0)
    install: float | None = Field(None, gt=0)
    suite: float | None = Field(None, gt=0)


class HostSettings(BaseModel):
    """Everything a host may set; `defaults` sets the same keys for all hosts."""

    model_config = ConfigDict(extra="forbid")
    user: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    identity: str | None = None
    known_hosts: str | None = None
    python: str | None = None
    workspace: str | None = None
    gpu: str | GpuSpec | None = None
    model: str | None = None
    timeouts: Timeouts | None = None
    env: dict[str, str] | None = None

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu(cls, v: Any) -> Any:
        if v is None or isinstance(v, GpuSpec):
            return v
        if isinstance(v, dict):
            return GpuSpec(**v)
        if isinstance(v, str):
            parse_gpu_requirement(v)  # validates
            return v
        raise ValueError("must be H100 (a name), any, none, or a mapping {name, compute_capability, "
                         "min_count, min_memory_gb}")

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key in v or {}:
            if _SECRET_NAME.search(key):
                raise ValueError(f"{key} looks like a secret; secrets never go in the inventory "
                                 "(the HF token is read from the local environment or HF cache)")
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return v


class Host(HostSettings):
    address: str

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not v.strip() or any(c.isspace() for c in v):
            raise ValueError(f"not a host address: {v!r}")
        return v


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    defaults: HostSettings = HostSettings()
    hosts: dict[str, Host]
    groups: dict[str, list[str]] = {}
    default_target: str | None = None

    @model_validator(mode="after")
    def _names(self) -> Inventory:
        for group, members in self.groups.items():
            if group in self.hosts:
                raise ValueError(f"groups.{group}: a host has the same name")
            for m in members:
                if m not in self.hosts:
                    raise ValueError(f"groups.{group}: unknown host {m!r}")
        if self.default_target and self.default_target not in (*self.hosts, *self.groups, "all"):
            raise ValueError(f"default_target: unknown host or group {self.default_target!r}")
        return self


@dataclass(frozen=True)
class HostConfig:
    """One host, every setting resolved (CLI > host > defaults > built-in)."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    identity: str | None = None
    known_hosts: str | None = None       # None: ~/.ssh/known_hosts (+ /etc/ssh/ssh_known_hosts)
    accept_new_host_key: bool = False
    python: str = "python3"
    workspace: str = DEFAULT_WORKSPACE
    gpu: GpuSpec | None = field(default_factory=GpuSpec)
    model: str = DEFAULT_MODEL
    model_explicit: bool = False         # False: a host without a GPU falls back to the tiny preset
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    install_timeout: float = DEFAULT_INSTALL_TIMEOUT
    suite_timeout: float = DEFAULT_SUITE_TIMEOUT
    env: dict[str, str] = field(default_factory=dict)
    local: bool = False

    @property
    def label(self) -> str:
        return "local" if self.local else f"{self.address}:{self.port}"

    def with_overrides(self, **kw: Any) -> HostConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def _format_validation(path: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-")) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = len(err.errors()) - 1
    return f"{path}: {loc}: {msg}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def parse_inventory(text: str, path: str = "inventory.yaml") -> Inventory:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise InventoryError(f"{path}: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: (top level): expected a mapping with 'hosts'")
    try:
        return Inventory.model_validate(data)
    except ValidationError as e:
        raise InventoryError(_format_validation(path, e)) from None


def load_inventory(path: str | Path) -> Inventory:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise InventoryError(f"{path}: cannot read inventory ({e.strerror})") from None
    return parse_inventory(text, str(path))


def select_hosts(inv: Inventory, target: str | None) -> list[str]:
    """A host name, a group name or `all` -> host names (inventory order, no duplicates)."""
    target = target or inv.default_target
    if not target:
        if len(inv.hosts) == 1:
            return list(inv.hosts)
        raise UsageError("no target: pass --target HOST|GROUP|all (or set default_target in the inventory)")
    if target == "all":
        return list(inv.hosts)
    if target in inv.hosts:
        return [target]
    if target in inv.groups:
        return list(dict.fromkeys(inv.groups[target]))
    known = ", ".join([*inv.hosts, *inv.groups, "all"])
    raise UsageError(f"unknown target {target!r} (known: {known})")


def resolve_host(inv: Inventory, name: str) -> HostConfig:
    host = inv.hosts[name]
    d = inv.defaults

    def pick(key: str) -> Any:
        v = getattr(host, key)
        return v if v is not None else getattr(d, key)

    gpu_raw = pick("gpu")
    timeouts = {**(d.timeouts.model_dump(exclude_none=True) if d.timeouts else {}),
                **(host.timeouts.model_dump(exclude_none=True) if host.timeouts else {})}
    model = pick("model")
    return HostConfig(
        name=name,
        address=host.address,
        port=pick("port") or 22,
        user=pick("user") or "root",
        identity=pick("identity"),
        known_hosts=pick("known_hosts"),
        python=pick("python") or "python3",
        workspace=pick("workspace") or DEFAULT_WORKSPACE,
        gpu=parse_gpu_requirement(gpu_raw) if gpu_raw is not None else GpuSpec(name="H100"),
        model=model or DEFAULT_MODEL,
        model_explicit=model is not None,
        connect_timeout=timeouts.get("connect", DEFAULT_CONNECT_TIMEOUT),
        install_timeout=timeouts.get("install", DEFAULT_INSTALL_TIMEOUT),
        suite_timeout=timeouts.get("suite", DEFAULT_SUITE_TIMEOUT),
        env={**(d.env or {}), **(host.env or {})},
    )
