"""The parity suite: flashcore vs PyTorch SDPA vs an fp32 reference on whole models (a library; the pytest
entry is tests/parity/test_parity_suite.py, the human entry `python -m flashcore.parity`).

    results    the flashcore.parity/2 document (pydantic; JSON Schema in parity.schema.json); no torch import
    criteria   pure pass/fail rules on logits
    decoding   greedy decoding and teacher forcing through dynamic, static (poisoned) and CUDA-graph caches
    prompts    random token prompts for random weights, chat prompts through a real model's template
    scenarios  the scenario registry (name, title, criterion, function): every list of names comes from it
    latency    decode ms/token at a 2048-token cache;   suite  run_suite() over one or several models
"""

from flashcore.parity.results import SCHEMA, ParityReport, SchemaError, summarize

__all__ = ["SCHEMA", "ParityReport", "SchemaError", "summarize"]
