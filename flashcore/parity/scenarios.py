"""The parity scenarios, registered in one place: REGISTRY maps a name to (title, criterion, function).

    @scenario("name", "title", "criterion")
    def name(models: Models, cfg: SuiteConfig) -> Outcome: ...

A new scenario is one such function here; every list of names (the suite's order, the pytest parametrization,
the configs) is derived from REGISTRY. Each takes the Models under test — one low-precision model switched
between flashcore and SDPA attention (same weights, same tokens) and an fp32 copy of the same weights with eager
attention as the reference — and returns an Outcome the suite turns into a ScenarioResult.

Together they drive every path production uses, each with its logits checked (STEP_CRITERION, flashcore/parity/criteria.py):
prefill over several query tiles, decode steps, chunked prefill after a cache, a left-padded batch whose padding
is longer than a key block, a static cache with garbage past its valid length (replayed from a CUDA graph on a
GPU), a long context whose decode runs over many cache splits, attention scores large enough to overflow
without max-subtraction, and the kernels' own default softmax scale.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from flashcore.integrations import (get_flashcore_attention_stats, make_attention, register,
                                    reset_flashcore_attention_stats, set_attention)
from flashcore.parity import criteria, decoding
from flashcore.parity.prompts import Prompts

STEP_CRITERION = ("max error over the steps: err(flashcore vs fp32 ref) <= 2*max err(sdpa vs fp32 ref) + eps "
                  "[eps = max(1e-4*max|ref|, 0.5*median err(sdpa))], err = max |logit difference| per step; top-1 "
                  "equal to the reference wherever its top-1 margin exceeds twice that bound; no NaN/inf")
REFERENCE = "fp32 copy of the same weights (upcast, exact), eager attention, whole model on the same device"


# -- the registry ------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    passed: bool
    measured: dict
    summary: str
    detail: str = ""
    worst_ratio: float | None = None   # max err/bound over every check of the scenario (None: no bound)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    criterion: str
    run: Callable[["Models", "SuiteConfig"], Outcome]


REGISTRY: dict[str, Scenario] = {}


def scenario(name: str, title: str, criterion: str = STEP_CRITERION):
    def add(fn):
        if name in REGISTRY:
            raise ValueError(f"scenario {name!r} registered twice")
        REGISTRY[name] = Scenario(name, title, criterion, fn)
        return fn
    return add


def scenario_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


# -- what the scenarios run on -----------------------------------------------------------------------------

@dataclass
class SuiteConfig:
    """Sizes of every scenario. GPU defaults here; for_device("cpu") shrinks them for the Triton interpreter
    (~0.1-3 s per kernel launch) while keeping every path: the CPU kernels' BLOCK_M is 64 and BLOCK_N 32, the
    GPU's 128 and 64 (tests/parity/test_coverage.py checks these sizes against the kernels' configs)."""
    prompt_len: int = 300              # single_token: > 2 query tiles
    gen_prompt_len: int = 128
    gen_short: int = 50
    chunk_short: int = 1               # teacher forcing: 1 = every step a single-token decode
    gen_long: int = 200
    chunk_long: int = 8                # (chunk - 1) tokens through the prefill kernel onto the cache, then a decode
    memory_steps: int = 8
    batch_lengths: tuple[int, ...] = (17, 40, 100, 200)   # left padding up to 183 > BLOCK_N
    batch_steps: int = 16
    chunk_batch: int = 1
    static_prompt_len: int = 200
    static_prompt_chunk: int = 128     # the second piece is a prefill over the poisoned static cache
    static_steps: int = 16
    static_cache_len: int = 4096       # allocated slots: the decode grid spans many (mostly empty) splits
    long_prompt_len: int = 2048        # many query tiles, fed in pieces; decode over many splits
    long_prompt_chunk: int = 512
    long_steps: int = 8
    scores_prompt_len: int = 128
    scores_steps: int = 8
    score_target: float = 128.0        # q/k scaled (by a power of 2) until the largest score reaches this
    scale_prompt_len: int = 64
    scale_steps: int = 8
    samples: int = 4                   # real models: chat prompts answered by reference, flashcore and SDPA
    sample_tokens: int = 48
    seed: int = 0
    latency: bool = True
    latency_cache_len: int = 2048
    latency_steps: int = 32
    scenarios: tuple[str, ...] = ()    # () = every registered scenario

    def __post_init__(self):
        unknown = [n for n in self.scenarios if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown scenario(s) {unknown} (known: {', '.join(REGISTRY)})")
        if not self.scenarios:
            self.scenarios = scenario_names()

    @classmethod
    def for_device(cls, device_kind: str, **overrides) -> "SuiteConfig":
        if device_kind == "cuda":
            return cls(**overrides)
        return cls(**{**CPU, **overrides})


CPU = dict(prompt_len=150, gen_prompt_len=16, chunk_short=5, chunk_long=25, memory_steps=4,
           batch_lengths=(5, 12, 40, 72), batch_steps=8, chunk_batch=4, static_prompt_len=40, static_prompt_chunk=24,
           static_steps=6, static_cache_len=512, long_prompt_len=320, long_prompt_chunk=128, long_steps=4,
           scores_prompt_len=48, scores_steps=4, scale_prompt_len=24, scale_steps=4, samples=1, sample_tokens=8,
           latency=False)


@dataclass(frozen=True)
class Kernels:
    """The attention kernels under test (default: flashcore.ops). Tests pass deliberately broken variants."""
    prefill: Callable
    decode: Callable

    @classmethod
    def default(cls) -> "Kernels":
        from flashcore.ops import decode_attention, prefill_attention
        return cls(prefill_attention, decode_attention)


@dataclass
class Models:
    lowp: torch.nn.Module            # switched between `attn` and "sdpa"
    ref: torch.nn.Module             # fp32 copy of the same weights, eager attention
    attn: str                        # the registered attention name of the kernels under test
    device: torch.device
    prompts: Prompts
    kernels: Kernels = field(default_factory=Kernels.default)
    notes: dict = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return self.lowp.config.vocab_size

    def flashcore(self) -> torch.nn.Module:
        return set_attention(self.lowp, self.attn)

    def sdpa(self) -> torch.nn.Module:
        return set_attention(self.lowp, "sdpa")


# -- shared steps ------------------------------------------------------------------------------------------

def _targets(models: Models, prompt: torch.Tensor, steps: int):
    """The reference's greedy continuation: (tokens [1, T], its logits [1, T, V])."""
    tokens, logits, _ = decoding.greedy(models.ref, prompt, steps)
    return tokens, logits


def _reference_prompt_and_steps(models: Models, prompt: torch.Tensor, steps: int):
    """The reference's greedy continuation and its logits at every prompt position and step, [P - 1 + T, V]
    (what _prompt_and_steps gives for flashcore and SDPA on these tokens), from the one greedy pass: the
    reference is not run a second time over its own tokens."""
    tokens, logits, first = decoding.greedy(models.ref, prompt, steps, prompt_logits=True)
    return tokens, torch.cat([first[0, :-1], logits[0]])


def _teacher_forced(models: Models, prompt, targets, **kwargs):
    """(sdpa logits, flashcore logits), each [B, T, V], for the same tokens fed the same way."""
    sdpa, _, _ = decoding.teacher_force(models.sdpa(), prompt, targets, **kwargs)
    fc, _, _ = decoding.teacher_force(models.flashcore(), prompt, targets, **kwargs)
    return sdpa, fc


def _prompt_and_steps(model, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits at every prompt position and every step, [P - 1 + T, V] (batch 1): a check over
    more positions, so its noise yardstick (SDPA's largest error) is not set by a handful of steps."""
    steps, _, first = decoding.teacher_force(model, prompt, tokens, prompt_logits=True)
    return torch.cat([first[0, :-1], steps[0]])


def _outcome(check: criteria.StepCheck, measured: dict, extra: str = "", detail: str = "") -> Outcome:
    return Outcome(passed=check.passed, measured={**measured, **check.measured(), "reference": REFERENCE},
                   summary=check.summary() + (f"; {extra}" if extra else ""),
                   detail="; ".join(x for x in (check.detail(), detail) if x), worst_ratio=check.worst_ratio)


def _how(chunk: int) -> str:
    return "every step a single-token decode" if chunk <= 1 else (
        f"fed through the cache in chunks of {chunk} ({chunk - 1} tokens via the prefill kernel, then one decode)")


# -- the scenarios -----------------------------------------------------------------------------------------

@scenario("single_token", "Prefill: logits at every position of a prompt spanning several query tiles")
def single_token(models: Models, cfg: SuiteConfig) -> Outcome:
    prompt = models.prompts.ids(cfg.prompt_len, key=1)

    def logits(model, fresh):
        return decoding.forward(model, prompt, decoding.new_cache(fresh), None, None, all_logits=True)[0]

    with torch.no_grad():
        ref = logits(models.ref, models.ref)
        sdpa = logits(models.sdpa(), models.lowp)
        fc = logits(models.flashcore(), models.lowp)
    check = criteria.check_steps(fc, sdpa, ref)
    measured = {"prompt_len": prompt.shape[1], "ref_top1_margin_last": float(criteria.top2_margin(ref[-1:])[0])}
    return _outcome(check, measured, f"{prompt.shape[1]} positions")


GENERATE = {"generate_50": "gen_short", "generate_200": "gen_long"}   # scenario -> its SuiteConfig step count


def _generate_targets(models: Models, cfg: SuiteConfig, steps: int):
    """The prompt of generate_50 and generate_200 (the same one) and the reference's greedy run over it: made
    once, as long as the longest of the two scenarios this run has, each taking its first `steps` tokens (a
    greedy run's first 50 steps are those of its 200). (prompt, tokens [1, steps], logits [1, steps, V])"""
    longest = max([steps, *(getattr(cfg, GENERATE[n]) for n in cfg.scenarios if n in GENERATE)])
    if models.notes.get("generate", (None, 0))[1] < longest:
        prompt = models.prompts.ids(cfg.gen_prompt_len, key=200)
        models.notes["generate"] = (prompt, longest, _targets(models, prompt, longest))
    prompt, _, (tokens, ref) = models.notes["generate"]
    return prompt, tokens[:, :steps], ref[:, :steps]


def _generate(models: Models, cfg: SuiteConfig, steps: int, chunk: int) -> Outcome:
    prompt, tokens, ref = _generate_targets(models, cfg, steps)
    sdpa, fc = _teacher_forced(models, prompt, tokens, chunk=chunk)
    check = criteria.check_steps(fc[0], sdpa[0], ref[0])
    # up to its first divergence from the reference, flashcore's own greedy run sees exactly the tokens it is
    # teacher-forced with, so its free-running choices there are the argmax of these logits
    free_fc = criteria.check_free_running(tokens[0].cpu(), ref[0].cpu(), fc[0].argmax(-1).cpu(), fc[0].cpu())
    free_sdpa = criteria.check_free_running(tokens[0].cpu(), ref[0].cpu(), sdpa[0].argmax(-1).cpu(), sdpa[0].cpu())
    at = lambda f: -1 if f.diverged_at is None else f.diverged_at  # noqa: E731
    diverge = ("greedy run identical to the reference" if free_fc.diverged_at is None else
               f"greedy run parts from the reference at step {free_fc.diverged_at} (reference margin there "
               f"{free_fc.ref_margin:.3g}; sdpa parts at {'never' if free_sdpa.diverged_at is None else at(free_sdpa)})")
    measured = {"prompt_len": prompt.shape[1], "tokens": steps, "teacher_forcing_chunk": chunk,
                "free_run_diverged_at_flashcore": at(free_fc), "free_run_diverged_at_sdpa": at(free_sdpa),
                "free_run_tokens_in_each_other_top5": free_fc.in_each_other_top_k}
    return _outcome(check, measured, diverge, f"teacher forcing: {_how(chunk)}")


@scenario("generate_50", "Greedy generation: teacher-forced logits, every step a decode")
def generate_50(models: Models, cfg: SuiteConfig) -> Outcome:
    return _generate(models, cfg, cfg.gen_short, cfg.chunk_short)


@scenario("generate_200", "Long greedy generation: chunked prefill after a cache, then a decode, repeated")
def generate_200(models: Models, cfg: SuiteConfig) -> Outcome:
    return _generate(models, cfg, cfg.gen_long, cfg.chunk_long)


def head_counts(model) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head_dim) of a model's config."""
    c = model.config
    return (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


@scenario("gqa_memory", "GQA KV-cache memory vs the MHA equivalent, and the logits decoded from it",
          "cache bytes == 2*layers*Hkv*tokens*head_dim*elem (keys stored un-repeated), ratio == Hq/Hkv, flashcore "
          "kernels served every call (no fallback); logits: " + STEP_CRITERION)
def gqa_memory(models: Models, cfg: SuiteConfig) -> Outcome:
    layers, hq, hkv, head_dim = head_counts(models.lowp)
    prompt = models.prompts.ids(cfg.gen_prompt_len, key=7)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 8)
    targets = torch.randint(0, models.vocab, (1, cfg.memory_steps), generator=g).to(models.device)
    on_gpu = models.device.type == "cuda"
    model = models.flashcore()
    reset_flashcore_attention_stats(model)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    fc, cache, _ = decoding.teacher_force(model, prompt, targets, chunk=1)
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    stats = get_flashcore_attention_stats(model).total
    sdpa, _, _ = decoding.teacher_force(models.sdpa(), prompt, targets, chunk=1)
    ref, _, _ = decoding.teacher_force(models.ref, prompt, targets, chunk=1)
    check = criteria.check_steps(fc[0], sdpa[0], ref[0])
    tokens = prompt.shape[1] + cfg.memory_steps - 1
    elem = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
    expected = 2 * layers * hkv * tokens * head_dim * elem
    measured_bytes = decoding.kv_cache_bytes(cache)
    mha = measured_bytes * hq // hkv
    ratio = mha / measured_bytes if measured_bytes else 0.0
    sizes_ok = (measured_bytes == expected and abs(ratio - hq / hkv) < 1e-9 and stats.decode_calls > 0
                and stats.fallback_calls == 0)
    models.notes["memory"] = dict(kv_cache_bytes=measured_bytes, kv_cache_bytes_mha=mha, ratio=ratio,
                                  peak_gpu_bytes=peak)
    measured = {"tokens_in_cache": tokens, "kv_cache_bytes": measured_bytes, "expected_bytes_unrepeated": expected,
                "kv_cache_bytes_mha": mha, "ratio": ratio, "expected_ratio": hq / hkv,
                "flashcore_decode_calls": stats.decode_calls, "fallback_calls": stats.fallback_calls,
                "peak_gpu_bytes": peak if peak is not None else "n/a (cpu)"}
    summary = (f"KV cache {measured_bytes / 2**20:.2f} MiB for {tokens} tokens vs {mha / 2**20:.2f} MiB "
               f"MHA-equivalent ({ratio:.1f}x smaller, {hq}:{hkv} heads)"
               + (f"; peak GPU {peak / 2**30:.2f} GiB (both models resident)" if peak is not None else ""))
    out = _outcome(check, measured, "", "" if sizes_ok else f"measured {measured_bytes} B, expected {expected} B; "
                                                            f"stats {stats}")
    out.passed = out.passed and sizes_ok
    out.summary = summary + "; logits: " + out.summary
    return out


def _left_padded(models: Models, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> (ids [B, W], 0/1 mask [B, W]) padded on the left."""
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=models.device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1]:] = row[0]
        mask[i, width - row.shape[1]:] = 1
    return ids, mask


@scenario("batch_4", "A left-padded batch whose padding is longer than a key block, each row against its "
          "prompt run alone", "per row, against that prompt run alone in fp32: " + STEP_CRITERION
          + "; finite logits everywhere, padding included")
def batch_4(models: Models, cfg: SuiteConfig) -> Outcome:
    rows = [models.prompts.ids(n, key=100 + i) for i, n in enumerate(cfg.batch_lengths)]
    refs = [_targets(models, row, cfg.batch_steps) for row in rows]  # each prompt alone, unpadded
    targets = torch.cat([tokens for tokens, _ in refs], dim=0)
    ids, mask = _left_padded(models, rows)
    sdpa, _, _ = decoding.teacher_force(models.sdpa(), ids, targets, mask=mask, chunk=cfg.chunk_batch)
    fc, _, fc_prefill = decoding.teacher_force(models.flashcore(), ids, targets, mask=mask, chunk=cfg.chunk_batch,
                                               prompt_logits=True)
    checks = [criteria.check_steps(fc[i], sdpa[i], refs[i][1][0]) for i in range(len(rows))]
    finite = bool(torch.isfinite(fc_prefill).all()) and bool(torch.isfinite(fc).all())
    lengths = [r.shape[1] for r in rows]
    measured = {"lengths": ",".join(map(str, lengths)), "max_left_padding": ids.shape[1] - min(lengths),
                "steps": cfg.batch_steps, "no_nan_anywhere": finite, "teacher_forcing_chunk": cfg.chunk_batch,
                "reference": REFERENCE}
    for i, c in enumerate(checks):
        measured.update({f"row{i}_max_err_flashcore": c.max_err_flashcore, f"row{i}_max_err_sdpa": c.max_err_sdpa,
                         f"row{i}_worst_err_over_bound": c.worst_ratio,
                         f"row{i}_confident_top1_mismatches": len(c.confident_mismatches),
                         f"row{i}_confident_steps": c.confident_steps, f"row{i}_passed": c.passed})
    worst = criteria.worst(checks)
    summary = (f"{sum(c.passed for c in checks)}/{len(checks)} rows within bounds (worst err/bound {worst:.2f}; "
               f"lengths {lengths}, left padding up to {measured['max_left_padding']}); confident top-1 mismatches "
               f"{sum(len(c.confident_mismatches) for c in checks)}/{sum(c.confident_steps for c in checks)}; "
               f"logits finite everywhere incl. padding: {finite}")
    detail = "; ".join(f"row {i}: {c.detail()}" for i, c in enumerate(checks) if not c.passed)
    return Outcome(finite and all(c.passed for c in checks), measured, summary, detail, worst)


@scenario("static_cache", "A static cache (valid length < allocated, NaN past it), decoded as CUDA graphs do")
def static_cache(models: Models, cfg: SuiteConfig) -> Outcome:
    prompt = models.prompts.ids(cfg.static_prompt_len, key=300)
    tokens, ref = _targets(models, prompt, cfg.static_steps)
    max_len = max(cfg.static_cache_len, prompt.shape[1] + cfg.static_steps + 8)
    sdpa, _, _ = decoding.teacher_force(models.sdpa(), prompt, tokens, prompt_chunk=cfg.static_prompt_chunk,
                                        cache=decoding.static_cache(models.lowp, max_len))  # clean cache
    graphed = models.device.type == "cuda"
    if graphed:
        fc = decoding.graph_teacher_force(models.flashcore(), prompt, tokens, max_len, cfg.static_prompt_chunk)
    else:
        fc, _, _ = decoding.teacher_force(models.flashcore(), prompt, tokens, prompt_chunk=cfg.static_prompt_chunk,
                                          cache=decoding.static_cache(models.lowp, max_len), poison_after_first=True)
    check = criteria.check_steps(fc[0], sdpa[0], ref[0])
    pieces = decoding.prompt_pieces(prompt.shape[1], cfg.static_prompt_chunk)
    measured = {"prompt_len": prompt.shape[1], "prompt_pieces": ",".join(map(str, pieces)), "steps": cfg.static_steps,
                "allocated_slots": max_len, "garbage": "NaN in every slot past the valid length",
                "decode": "CUDA graph replay" if graphed else "eager (no CUDA)"}
    return _outcome(check, measured, f"{max_len} slots allocated, at most {prompt.shape[1] + cfg.static_steps} "
                    f"valid; decode {'replayed from a CUDA graph' if graphed else 'eager'}")


@scenario("long_context", "A long prompt prefilled in pieces after a cache, then decoded over many cache splits")
def long_context(models: Models, cfg: SuiteConfig) -> Outcome:
    prompt = models.prompts.ids(cfg.long_prompt_len, key=400)
    tokens, ref = _targets(models, prompt, cfg.long_steps)
    sdpa, fc = _teacher_forced(models, prompt, tokens, prompt_chunk=cfg.long_prompt_chunk)
    check = criteria.check_steps(fc[0], sdpa[0], ref[0])
    pieces = decoding.prompt_pieces(prompt.shape[1], cfg.long_prompt_chunk)
    measured = {"prompt_len": prompt.shape[1], "prompt_pieces": ",".join(map(str, pieces)), "steps": cfg.long_steps}
    return _outcome(check, measured, f"{prompt.shape[1]}-token prompt in pieces {pieces}")


# -- large attention scores --------------------------------------------------------------------------------

def _probe_attention(record: list):
    """Eager attention that also records the largest pre-softmax score it saw (post-RoPE q.k * scaling)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scores = torch.matmul(query.float(), repeat_kv(key, module.num_key_value_groups).float().transpose(2, 3))
        scores = scores * scaling
        if attention_mask is not None:  # eager's additive mask: masked scores sink to ~ -3e38
            scores = scores + attention_mask.float()
        record.append(float(scores.amax()))
        return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)
    return attention


def max_score(model, prompt: torch.Tensor) -> float:
    """The largest pre-softmax attention score of a forward over `prompt` (an fp32 model, eager masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    record: list[float] = []
    AttentionInterface.register("fcore_probe", _probe_attention(record))
    AttentionMaskInterface.register("fcore_probe", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    previous = model.config._attn_implementation
    try:
        with torch.no_grad():
            decoding.forward(set_attention(model, "fcore_probe"), prompt, decoding.new_cache(model), None, None)
    finally:
        set_attention(model, previous)
    return max(record)


def _qk_projections(model):
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            yield module.q_proj
            yield module.k_proj


@contextlib.contextmanager
def scaled_qk(models: Models, factor: float):
    """q and k projections of both models multiplied by `factor` (a power of two: exact, and undone exactly)."""
    for model in (models.lowp, models.ref):
        for proj in _qk_projections(model):
            for p in proj.parameters():
                p.data.mul_(factor)
    try:
        yield
    finally:
        for model in (models.lowp, models.ref):
            for proj in _qk_projections(model):
                for p in proj.parameters():
                    p.data.div_(factor)


@scenario("large_scores", "Attention scores past exp's range (q/k projections scaled, as attention sinks do): "
          "logits at every prompt position and decode step",
          STEP_CRITERION + "; the largest pre-softmax score reaches the target (a kernel without "
          "max-subtraction overflows there)")
def large_scores(models: Models, cfg: SuiteConfig) -> Outcome:
    prompt = models.prompts.ids(cfg.scores_prompt_len, key=500)
    before = max_score(models.ref, prompt)
    factor = 2.0 ** max(0, math.ceil(0.5 * math.log2(cfg.score_target / max(before, 1e-3))))
    with scaled_qk(models, factor):
        reached = max_score(models.ref, prompt)
        tokens, ref = _reference_prompt_and_steps(models, prompt, cfg.scores_steps)
        sdpa = _prompt_and_steps(models.sdpa(), prompt, tokens)   # one at a time: sdpa() and flashcore() switch
        fc = _prompt_and_steps(models.flashcore(), prompt, tokens)  # the same model's attention
    check = criteria.check_steps(fc, sdpa, ref)
    measured = {"prompt_len": prompt.shape[1], "steps": cfg.scores_steps, "qk_scale_factor": factor,
                "max_score_unscaled": before, "max_score": reached, "score_target": cfg.score_target}
    out = _outcome(check, measured, f"q, k projections x{factor:g}: largest score {reached:.0f} "
                   f"(unscaled {before:.1f}; exp overflows fp32 past ~88)")
    if reached < cfg.score_target:
        out.passed = False
        out.detail = f"largest score {reached:.1f} stayed below the target {cfg.score_target}; " + out.detail
    return out


# -- the kernels' own default softmax scale -----------------------------------------------------------------

def _default_scale_kernels(kernels: Kernels, counter: dict):
    """The kernels called without sm_scale where the model's scale is the default 1/sqrt(head_dim)."""
    def wrap(fn):
        def call(q, *args, sm_scale=None, **kwargs):
            if sm_scale is not None and math.isclose(sm_scale, q.shape[-1] ** -0.5, rel_tol=1e-12):
                counter["default"] = counter.get("default", 0) + 1
                return fn(q, *args, **kwargs)
            counter["explicit"] = counter.get("explicit", 0) + 1
            return fn(q, *args, sm_scale=sm_scale, **kwargs)
        return call
    return make_attention(wrap(kernels.prefill), wrap(kernels.decode))


@scenario("default_scale", "The kernels' own default softmax scale (sm_scale omitted): logits at every prompt "
          "position and decode step",
          STEP_CRITERION + "; every kernel call used the default scale")
def default_scale(models: Models, cfg: SuiteConfig) -> Outcome:
    prompt = models.prompts.ids(cfg.scale_prompt_len, key=600)
    tokens, ref = _reference_prompt_and_steps(models, prompt, cfg.scale_steps)
    counter: dict = {}
    name = register(f"{models.attn}_default_scale", _default_scale_kernels(models.kernels, counter))
    sdpa = _prompt_and_steps(models.sdpa(), prompt, tokens)
    fc = _prompt_and_steps(set_attention(models.lowp, name), prompt, tokens)
    check = criteria.check_steps(fc, sdpa, ref)
    calls, explicit = counter.get("default", 0), counter.get("explicit", 0)
    out = _outcome(check, {"prompt_len": prompt.shape[1], "steps": cfg.scale_steps, "default_scale_calls": calls,
                           "explicit_scale_calls": explicit}, f"{calls} kernel calls with the default scale")
    if not calls or explicit:
        out.passed = False
        out.detail = f"{calls} calls used the default scale, {explicit} an explicit one; " + out.detail
    return out


# -- real models: chat answers side by side (display, not verdict) -----------------------------------------

@torch.no_grad()
def chat_samples(models: Models, cfg: SuiteConfig) -> list[dict]:
    """For a model with a tokenizer: cfg.samples chat prompts answered greedily (cfg.sample_tokens new tokens)
    by the reference, flashcore and SDPA through generate() (flashcore and SDPA with a static cache, as
    generate(cache_implementation="static") serves), batched with left padding."""
    prompts = models.prompts
    if not prompts.real or cfg.samples <= 0:
        return []
    chats = [prompts.chat(i) for i in range(cfg.samples)]
    ids, mask = _left_padded(models, [c[1] for c in chats])
    tok = prompts.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    common = dict(attention_mask=mask, max_new_tokens=cfg.sample_tokens, do_sample=False, pad_token_id=pad,
                  return_dict_in_generate=True, output_logits=True)
    ref = models.ref.generate(ids, **common)
    static = dict(cache_implementation="static", disable_compile=True)
    fc = models.flashcore().generate(ids, **common, **static)
    sdpa = models.sdpa().generate(ids, **common, **static)
    width = ids.shape[1]
    out = []
    for i, (user, prompt) in enumerate(chats):
        new = {k: g.sequences[i, width:].cpu() for k, g in (("ref", ref), ("fc", fc), ("sdpa", sdpa))}
        ref_logits, fc_logits = (torch.stack([step[i] for step in g.logits]).float().cpu() for g in (ref, fc))
        n = min(len(new["ref"]), len(new["fc"]))
        free = criteria.check_free_running(new["ref"][:n], ref_logits[:n], new["fc"][:n], fc_logits[:n])
        out.append(dict(prompt=user, prompt_tokens=prompt.shape[1], reference=prompts.decode(new["ref"]),
                        flashcore=prompts.decode(new["fc"]), sdpa=prompts.decode(new["sdpa"]),
                        new_tokens=cfg.sample_tokens, first_divergence=free.diverged_at,
                        divergence_margin=free.ref_margin))
    return out
