"""The parity suite: flashcore vs PyTorch SDPA vs an fp32 reference on a whole model (a library; the pytest
entry is tests/parity/test_parity_suite.py, the human entry `python -m flashcore.parity`).

    results    the flashcore.parity/1 document as dataclasses (the pipeline imports these)
    criteria   pure pass/fail rules on logits
    decoding   greedy decoding and teacher forcing through a KV cache
    scenarios  the five scenarios; latency  decode ms/token at a 2048-token cache; suite  run_suite()
"""

from flashcore.parity.results import SCENARIO_NAMES, SCHEMA, ParityReport, SchemaError

__all__ = ["SCENARIO_NAMES", "SCHEMA", "ParityReport", "SchemaError"]
