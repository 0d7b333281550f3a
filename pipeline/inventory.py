"""inventory.yaml: defaults, hosts and groups (pydantic). `pipeline.settings` layers it with the built-in defaults,
~/.ssh/config and the flags into one `HostConfig` per target host.

    defaults: {user: root, known_hosts: ~/.ssh/known_hosts, gpu: H100, model: llama-3.1-8b}
    hosts:
      runpod-a: {address: 203.0.113.7, port: 22022, identity: ~/.ssh/runpod, python: /opt/conda/bin/python}
      lab-b: {address: gpu-b.example.org}
    groups:
      nightly: [runpod-a, lab-b]
    clusters:      # Slurm: one job array through the login node (pipeline.cluster; fields: slurm.SlurmConfig)
      lab: {executor: slurm, login: lab-b, workspace: /shared/alice/flashcore, partition: gpu, gpus: 64}

Unknown keys and bad values are rejected with the file, the field and why (`InventoryError`, exit 2); so is a
file that is not UTF-8 YAML (binary, invalid UTF-8, nesting deeper than libyaml's 1000 levels) and a mapping with
a duplicate key (YAML says last-wins; a second `hosts:` or host entry silently replacing the first is a mistake).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import InventoryError, UsageError

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL", re.IGNORECASE)
_CC = re.compile(r"^\d+\.\d+$")


def check_env_names(env: dict[str, str] | None) -> dict[str, str] | None:
    """An inventory's `env:` (a host's, a cluster's): variable names only, and none that looks like a secret."""
    for key in env or {}:
        if _SECRET_NAME.search(key):
            raise ValueError(f"{key} looks like a secret; secrets never go in the inventory "
                             "(the HF token is read from the local environment or HF cache)")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ValueError(f"{key!r} is not a valid environment variable name")
    return env


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
    connect: float | None = Field(None, gt=0, allow_inf_nan=False)
    install: float | None = Field(None, gt=0, allow_inf_nan=False)
    suite: float | None = Field(None, gt=0, allow_inf_nan=False)
    lock: float | None = Field(None, ge=0, allow_inf_nan=False)
    host: float | None = Field(None, gt=0, allow_inf_nan=False)   # a fleet host's wall limit, all steps


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
    gpus: list[int] | None = Field(None, min_length=1)    # validate these GPUs (nvidia-smi indices); default all
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

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(i < 0 for i in v):
            raise ValueError("GPU indices are 0 or more")
        return list(dict.fromkeys(v)) if v is not None else None

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_env_names(v)


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
    hosts: dict[str, Host] = {}
    groups: dict[str, list[str]] = {}
    clusters: dict[str, dict[str, Any]] = {}   # `executor: slurm` entries: pipeline.cluster checks each one
    default_target: str | None = None
    history: str | None = None        # the history store (default: history.sqlite beside the reports)

    @field_validator("history")
    @classmethod
    def _history(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty path")
        return v

    @model_validator(mode="after")
    def _names(self) -> Inventory:
        if not {"hosts", "clusters"} & self.model_fields_set:
            raise ValueError("hosts: Field required (or clusters)")
        for group, members in self.groups.items():
            if group in self.hosts:
                raise ValueError(f"groups.{group}: a host has the same name")
            for m in members:
                if m in self.clusters:
                    raise ValueError(f"groups.{group}: {m!r} is a Slurm cluster, run on its own (--target {m})")
                if m not in self.hosts:
                    raise ValueError(f"groups.{group}: unknown host {m!r}")
        for name in self.clusters:
            if name in self.hosts or name in self.groups or name == "all":
                raise ValueError(f"clusters.{name}: a host or group has the same name")
        if self.default_target and self.default_target not in (*self.hosts, *self.groups, *self.clusters, "all"):
            raise ValueError(f"default_target: unknown host or group {self.default_target!r}")
        return self


def format_validation(path: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-")) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = len(err.errors()) - 1
    return f"{path}: {loc}: {msg}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's C parser when present: fast
    """The safe loader, refusing duplicate keys."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first on line "
                                                        f"{seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        except TypeError:      # an unhashable key: construct_mapping says so below
            continue
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_error(path: str, text: str, e: yaml.YAMLError) -> InventoryError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        where = f"line {mark.line + 1}"
    elif isinstance(getattr(e, "position", None), int):          # a ReaderError: a character YAML refuses
        where = f"line {text[:e.position].count(chr(10)) + 1}"
    else:
        where = "?"
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return InventoryError(f"{path}: {where}: not valid YAML ({problem})")


def parse_inventory(text: str | bytes, path: str = "inventory.yaml") -> Inventory:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text[:e.start].count(b"\n") + 1
            raise InventoryError(f"{path}: line {line}: not UTF-8 text (byte 0x{text[e.start]:02x})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise _yaml_error(path, text, e) from None
    except RecursionError:     # the pure-Python loader (no libyaml) on absurd nesting
        raise InventoryError(f"{path}: nested too deeply to be an inventory") from None
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: (top level): expected a mapping with 'hosts'")
    try:
        return Inventory.model_validate(data)
    except ValidationError as e:
        raise InventoryError(format_validation(path, e)) from None
    except RecursionError:
        raise InventoryError(f"{path}: nested too deeply to be an inventory") from None


def load_inventory(path: str | Path) -> Inventory:
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InventoryError(f"{path}: cannot read inventory ({e.strerror})") from None
    return parse_inventory(data, str(path))


def parse_target_file(text: str) -> list[str]:
    """A `--target @file` list: one host or group per line; blank lines and `#` comments are ignored."""
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


def select_targets(inv: Inventory, targets: list[str | None]) -> list[str]:
    """The hosts of several targets (a `--target @file`), inventory order kept per target, each host once."""
    return list(dict.fromkeys(h for t in targets for h in select_hosts(inv, t)))


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
    if target in inv.clusters:
        raise UsageError(f"{target!r} is a Slurm cluster: validate it with flashcore-deploy --target {target}")
    known = ", ".join([*inv.hosts, *inv.groups, "all"])
    raise UsageError(f"unknown target {target!r} (known: {known})")
