"""The suite must be able to fail, and must not fail correct kernels.

Mutation catalogue (flashcore/parity/mutants.py): each mutant is a plausible bug written into a copy of the real
kernel source; the suite's verdict on the tiny preset must flip to FAILED, by its criteria (a logit error past
the bound, a confident top-1 flip or a NaN), not by an exception. To keep CI short each mutant runs the
scenarios its catalogue entry names (a failing scenario fails the whole suite: the verdict is their AND);
benchmarks/parity_mutants.py runs every mutant against every scenario for the table in docs/PARITY.md.
"""

from __future__ import annotations

import pytest
import torch

from flashcore.parity import mutants
from flashcore.parity.scenarios import REGISTRY, SuiteConfig
from flashcore.parity.suite import run_suite

DEVICE_KIND = "cuda" if torch.cuda.is_available() else "cpu"


def test_catalogue_covers_both_kernels_and_every_bug_class():
    names = mutants.CATALOGUE
    assert len(names) >= 12 and len({(m.file, m.edits) for m in names.values()}) == len(names)
    assert {m.file for m in names.values()} == {"prefill", "decode", "_common"}
    assert all(set(m.catches) <= set(REGISTRY) and m.catches for m in names.values())


@pytest.mark.parametrize("name", list(mutants.CATALOGUE))
def test_mutant_fails_the_suite(name):
    mutant = mutants.CATALOGUE[name]
    config = SuiteConfig.for_device(DEVICE_KIND, scenarios=mutant.catches)
    report = run_suite("tiny", config=config, kernels=mutants.load(mutant), fail_fast=True)
    assert not report.passed, f"{name} ({mutant.bug}) passed the suite"
    failing = [s for s in report.runs[0].scenarios if not s.passed]
    assert failing and all(s.criterion != "(not evaluated)" for s in failing), \
        [(s.name, s.summary, s.detail) for s in failing]
    ratio = failing[0].worst_err_over_bound
    assert isinstance(ratio, str) or ratio > 1, (failing[0].name, failing[0].summary)


def test_stale_mutant_is_named():
    stale = mutants.Mutant("gone", "a bug in code that was rewritten", "decode", ((r"no_such_code\(\)", "x"),),
                           ("generate_50",))
    with pytest.raises(mutants.MutantStale, match="gone.*no_such_code"):
        mutants.load(stale)


@pytest.mark.parametrize("seed", [1, 2])
def test_correct_kernels_pass_every_scenario_across_seeds(seed):
    """No false alarm: the real kernels, the whole suite, other random weights and prompts
    (benchmarks/parity_seeds.py runs 50+ seeds for docs/PARITY.md)."""
    report = run_suite("tiny", config=SuiteConfig.for_device(DEVICE_KIND), seed=seed)
    assert report.passed, [(s.name, s.summary, s.detail) for s in report.runs[0].scenarios if not s.passed]
    assert all(s.worst_err_over_bound < 1 for s in report.runs[0].scenarios)
