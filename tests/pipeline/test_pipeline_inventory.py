"""inventory.yaml: the documented shape parses; every bad value names the file, the field and why."""

from __future__ import annotations

import pytest

from pathlib import Path

from pipeline.errors import InventoryError, UsageError
from pipeline.inventory import (GpuSpec, describe_gpu_requirement, load_inventory, parse_gpu_requirement,
                                parse_inventory, select_hosts)
from pipeline.settings import Flags, layered

REPO = Path(__file__).resolve().parents[2]


def resolve_host(inv, name):
    """The inventory's host through the one layering (no ssh_config, no flags)."""
    return layered(Flags(inventory="inv.yaml", target=name), inv, None)[0][0]

SHAPE = """
defaults: {user: root, known_hosts: ~/.ssh/known_hosts, gpu: H100, model: llama-3.1-8b}
hosts:
  runpod-a: {address: 203.0.113.7, port: 22022, identity: ~/.ssh/runpod, python: /opt/conda/bin/python}
  lab-b: {address: gpu-b.example.org}
groups:
  nightly: [runpod-a, lab-b]
"""


def test_issue_shape_and_resolution():
    inv = parse_inventory(SHAPE)
    assert select_hosts(inv, "nightly") == ["runpod-a", "lab-b"]
    assert select_hosts(inv, "all") == ["runpod-a", "lab-b"]
    assert select_hosts(inv, "lab-b") == ["lab-b"]
    a, b = resolve_host(inv, "runpod-a"), resolve_host(inv, "lab-b")
    assert (a.address, a.port, a.user, a.python, a.identities) == \
        ("203.0.113.7", 22022, "root", "/opt/conda/bin/python", (str(Path("~/.ssh/runpod").expanduser()),))
    assert (b.port, b.python, b.known_hosts, b.model) == \
        (22, "python3", (str(Path("~/.ssh/known_hosts").expanduser()),), "llama-3.1-8b")
    assert a.gpu == GpuSpec(name="H100")


def test_shipped_example_is_valid():
    inv = load_inventory(REPO / "inventory.yaml")
    assert set(inv.hosts) >= {"runpod-a", "lab-b"} and inv.groups["nightly"] == ["runpod-a", "lab-b"]
    box = resolve_host(inv, "gpu-box")
    assert box.python == "/opt/torch/.venv/bin/python3" and box.port == 2222
    lab = resolve_host(inv, "lab-b")
    assert lab.gpu == GpuSpec(name="H100", compute_capability="9.0", min_count=1, min_memory_gb=80)
    assert select_hosts(inv, None) == ["runpod-a"]


def test_host_overrides_defaults_and_timeouts_merge():
    inv = parse_inventory("""
defaults: {port: 2200, gpu: any, timeouts: {connect: 5, suite: 100}, env: {A: "1"}}
hosts:
  x: {address: h, gpu: none, timeouts: {suite: 7}, env: {B: "2"}, model: tiny}
""")
    x = resolve_host(inv, "x")
    assert (x.port, x.gpu, x.connect_timeout, x.suite_timeout, x.env, x.model) == \
        (2200, None, 5, 7, {"A": "1", "B": "2"}, "tiny")


@pytest.mark.parametrize("text, where", [
    ("hosts: {a: {address: h, prot: 22}}", "hosts.a.prot: unknown key"),
    ("hosts: {a: {address: h, port: 70000}}", "hosts.a.port:"),
    ("hosts: {a: {address: h, port: twenty}}", "hosts.a.port:"),
    ("hosts: {a: {port: 22}}", "hosts.a.address: Field required"),
    ("hosts: {a: {address: h, gpu: {name: H100, compute_capability: nine}}}", "hosts.a.gpu"),
    ("hosts: {a: {address: h, gpu: {name: H100, min_count: 0}}}", "hosts.a.gpu"),
    ("hosts: {a: {address: h, gpu: ''}}", "hosts.a.gpu"),
    ("hosts: {a: {address: h, env: {HF_TOKEN: x}}}", "hosts.a.env: HF_TOKEN looks like a secret"),
    ("hosts: {a: {address: h}}\ngroups: {g: [a, b]}", "groups.g: unknown host 'b'"),
    ("hosts: {a: {address: h}}\ndefault_target: zz", "default_target: unknown host or group 'zz'"),
    ("defaults: {usr: root}\nhosts: {a: {address: h}}", "defaults.usr: unknown key"),
    ("hosts: {a: {address: h}}\nextra: 1", "extra: unknown key"),
    ("hosts: [a, b]", "hosts:"),
    ("hosts: {a: {address: h}\n", "line"),
    ("- just\n- a list", "(top level)"),
])
def test_bad_inventory_names_file_and_field(text, where):
    with pytest.raises(InventoryError) as e:
        parse_inventory(text, "inv.yaml")
    msg = str(e.value)
    assert msg.startswith("inv.yaml: ") and where in msg and "\n" not in msg


def test_unknown_target_lists_known_ones():
    inv = parse_inventory(SHAPE)
    with pytest.raises(UsageError, match="unknown target 'nope'.*runpod-a, lab-b, nightly, all"):
        select_hosts(inv, "nope")
    with pytest.raises(UsageError, match="no target"):
        select_hosts(inv, None)


def test_gpu_shorthand():
    assert parse_gpu_requirement("none") is None
    assert parse_gpu_requirement("any") == GpuSpec()
    assert parse_gpu_requirement("h100") == GpuSpec(name="h100")
    assert describe_gpu_requirement(GpuSpec(name="H100", compute_capability="9.0", min_count=2,
                                            min_memory_gb=80)) == "H100, cc >= 9.0, x2, >= 80 GB"
    assert describe_gpu_requirement(None) == "none"
