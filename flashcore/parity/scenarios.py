"""The five parity scenarios. Each takes the Models under test and a SuiteConfig and returns a ScenarioResult.

Models: one low-precision model that is switched between flashcore and SDPA attention (same weights, same
tokens), and an fp32 copy of the same weights with eager attention as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashcore.integrations import get_flashcore_attention_stats, reset_flashcore_attention_stats, set_attention
from flashcore.parity import criteria, decoding
from flashcore.parity.results import ScenarioResult

STEP_CRITERION = ("per step err(flashcore vs fp32 ref) <= 2*err(sdpa vs fp32 ref) + eps "
                  "[eps = max(1e-4*max|ref|, 0.5*median err(sdpa))]; top-1 equal to the reference wherever its "
                  "top-1 margin exceeds twice that bound; top-1 agreement with the reference >= SDPA's minus "
                  "max(2 binomial sd, 1 step); no NaN/inf")


@dataclass
class SuiteConfig:
    prompt_len: int = 128
    gen_short: int = 50
    gen_long: int = 200
    batch_lengths: tuple[int, ...] = (17, 40, 64, 100)
    batch_steps: int = 16
    chunk_short: int = 1         # teacher forcing: 1 = every step is a single-token decode
    chunk_long: int = 1
    chunk_batch: int = 1
    memory_steps: int = 8
    seed: int = 0
    latency: bool = True
    latency_cache_len: int = 2048
    latency_steps: int = 32
    scenarios: tuple[str, ...] = ("single_token", "generate_50", "generate_200", "gqa_memory", "batch_4")

    @classmethod
    def for_device(cls, device_kind: str, **overrides) -> "SuiteConfig":
        """GPU: every teacher-forced step is a decode step. CPU (Triton interpreter, ~0.1 s per kernel launch):
        short prompts, and long runs fed in chunks (prefill kernel onto the cache + one decode step per chunk)."""
        if device_kind == "cuda":
            return cls(**overrides)
        cpu = dict(prompt_len=16, batch_lengths=(5, 9, 12, 16), batch_steps=8, chunk_short=10, chunk_long=25,
                   chunk_batch=4, memory_steps=4, latency=False)
        return cls(**{**cpu, **overrides})


@dataclass
class Models:
    lowp: torch.nn.Module            # switched between `attn` and "sdpa"
    ref: torch.nn.Module             # fp32 copy of the same weights, eager attention
    attn: str                        # the flashcore implementation under test (registered name)
    device: torch.device
    notes: dict = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return self.lowp.config.vocab_size

    def flashcore(self) -> torch.nn.Module:
        return set_attention(self.lowp, self.attn)

    def sdpa(self) -> torch.nn.Module:
        return set_attention(self.lowp, "sdpa")


def _prompt(models: Models, length: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, models.vocab, (batch, length), generator=g).to(models.device)


def _result(name: str, title: str, passed: bool, criterion: str, measured: dict, summary: str,
            detail: str = "") -> ScenarioResult:
    return ScenarioResult(name=name, title=title, passed=bool(passed), criterion=criterion, measured=measured,
                          summary=summary, detail=detail)


def _step_summary(check: criteria.StepCheck) -> str:
    return (f"max err flashcore {check.max_err_flashcore:.3g} vs sdpa {check.max_err_sdpa:.3g} "
            f"(worst err/bound {check.worst_ratio:.2f}); top-1 agree {check.agree_flashcore:.0%} vs sdpa "
            f"{check.agree_sdpa:.0%}; confident mismatches {len(check.confident_mismatches)}/{check.confident_steps}")


def _step_detail(check: criteria.StepCheck) -> str:
    parts = []
    if check.bound_violations:
        parts.append(f"bound exceeded at steps {check.bound_violations[:10]}")
    if check.confident_mismatches:
        parts.append(f"top-1 differs from the reference at confident steps {check.confident_mismatches[:10]}")
    if not check.agreement_ok:
        parts.append(f"top-1 agreement {check.agree_flashcore:.1%} below SDPA's {check.agree_sdpa:.1%} "
                     f"minus slack {check.agree_slack:.1%}")
    if not check.finite:
        parts.append("non-finite logits")
    return "; ".join(parts)


def single_token(models: Models, cfg: SuiteConfig) -> ScenarioResult:
    prompt = _prompt(models, cfg.prompt_len, cfg.seed)
    with torch.no_grad():
        ref = decoding.forward(models.ref, prompt, decoding.new_cache(models.ref), None, None)[:, -1]
        sdpa = decoding.forward(models.sdpa(), prompt, decoding.new_cache(models.lowp), None, None)[:, -1]
        fc = decoding.forward(models.flashcore(), prompt, decoding.new_cache(models.lowp), None, None)[:, -1]
    check = criteria.check_steps(fc.cpu(), sdpa.cpu(), ref.cpu())
    measured = {"prompt_len": cfg.prompt_len, **check.measured(),
                "ref_top1_margin": float(criteria.top2_margin(ref.cpu())[0])}
    return _result("single_token", f"Next-token logits after a {cfg.prompt_len}-token prompt", check.passed,
                   STEP_CRITERION, measured, _step_summary(check), _step_detail(check))


def generate(models: Models, cfg: SuiteConfig, steps: int, chunk: int, name: str) -> ScenarioResult:
    prompt = _prompt(models, cfg.prompt_len, cfg.seed + steps)
    ref_tokens, ref_logits = decoding.greedy(models.ref, prompt, steps)
    sdpa_logits, _, _ = decoding.teacher_force(models.sdpa(), prompt, ref_tokens, chunk=chunk)
    fc_logits, _, _ = decoding.teacher_force(models.flashcore(), prompt, ref_tokens, chunk=chunk)
    ref_l, sdpa_l, fc_l, tok = ref_logits[0].cpu(), sdpa_logits[0].cpu(), fc_logits[0].cpu(), ref_tokens[0].cpu()
    check = criteria.check_steps(fc_l, sdpa_l, ref_l)
    # free running: up to its first divergence from the reference, flashcore's own greedy run sees exactly the
    # tokens it is teacher-forced with, so its free-running choices there are the argmax of these logits
    free_fc = criteria.check_free_running(tok, ref_l, fc_l.argmax(-1), fc_l)
    free_sdpa = criteria.check_free_running(tok, ref_l, sdpa_l.argmax(-1), sdpa_l)
    passed = check.passed and free_fc.passed
    how = "every step a single-token decode" if chunk <= 1 else (
        f"fed through the cache in chunks of {chunk} ({chunk - 1} tokens via the prefill kernel, then one decode)")
    measured = {"prompt_len": cfg.prompt_len, "tokens": steps, "teacher_forcing_chunk": chunk, **check.measured(),
                "free_run_diverged_at_flashcore": -1 if free_fc.diverged_at is None else free_fc.diverged_at,
                "free_run_diverged_at_sdpa": -1 if free_sdpa.diverged_at is None else free_sdpa.diverged_at,
                "free_run_topk_ok": free_fc.passed}
    diverge = ("never diverged from the reference" if free_fc.diverged_at is None else
               f"first greedy divergence at step {free_fc.diverged_at} (sdpa: "
               f"{'none' if free_sdpa.diverged_at is None else free_sdpa.diverged_at}), "
               f"{'both tokens in each other top-5' if free_fc.passed else 'NOT in each other top-5'}")
    detail = "; ".join(x for x in (_step_detail(check), f"teacher forcing: {how}") if x)
    return _result(name, f"Greedy generation of {steps} tokens: teacher-forced logits + vLLM-style free run",
                   passed, STEP_CRITERION + f"; free-running: at the first divergence each token is in the other's "
                   f"top-{criteria.TOP_K}", measured, _step_summary(check) + "; " + diverge, detail)


def gqa_memory(models: Models, cfg: SuiteConfig) -> ScenarioResult:
    config = models.lowp.config
    layers, hq, hkv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // hq
    prompt = _prompt(models, cfg.prompt_len, cfg.seed + 7)
    targets = _prompt(models, cfg.memory_steps, cfg.seed + 8)
    on_gpu = models.device.type == "cuda"
    model = models.flashcore()
    reset_flashcore_attention_stats(model)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    logits, cache, _ = decoding.teacher_force(model, prompt, targets, chunk=1)
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    tokens = cfg.prompt_len + cfg.memory_steps - 1
    elem = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
    expected = 2 * layers * 1 * hkv * tokens * head_dim * elem
    measured_bytes = decoding.kv_cache_bytes(cache)
    mha = measured_bytes * hq // hkv
    ratio = mha / measured_bytes if measured_bytes else 0.0
    stats = get_flashcore_attention_stats(model).total
    ok = (measured_bytes == expected and abs(ratio - hq / hkv) < 1e-9 and stats.decode_calls > 0
          and stats.fallback_calls == 0 and bool(torch.isfinite(logits).all()))
    models.notes["memory"] = dict(kv_cache_bytes=measured_bytes, kv_cache_bytes_mha=mha, ratio=ratio,
                                  peak_gpu_bytes=peak)
    measured = {"tokens_in_cache": tokens, "kv_cache_bytes": measured_bytes, "expected_bytes_unrepeated": expected,
                "kv_cache_bytes_mha": mha, "ratio": ratio, "expected_ratio": hq / hkv,
                "flashcore_decode_calls": stats.decode_calls, "fallback_calls": stats.fallback_calls,
                "peak_gpu_bytes": peak if peak is not None else "n/a (cpu)"}
    summary = (f"KV cache {measured_bytes / 2**20:.2f} MiB for {tokens} tokens vs {mha / 2**20:.2f} MiB MHA-equivalent "
               f"({ratio:.1f}x smaller, {hq}:{hkv} heads)"
               + (f"; peak GPU {peak / 2**30:.2f} GiB (both models resident)" if peak is not None else ""))
    return _result("gqa_memory", "GQA KV-cache memory vs the MHA equivalent", ok,
                   f"cache bytes == 2*layers*Hkv*tokens*head_dim*elem (keys stored un-repeated), ratio == Hq/Hkv "
                   f"({hq // hkv}), flashcore kernels served every call (no fallback)", measured, summary,
                   "" if ok else f"measured {measured_bytes} B, expected {expected} B; stats {stats}")


def batch_4(models: Models, cfg: SuiteConfig) -> ScenarioResult:
    lengths = list(cfg.batch_lengths)
    width = max(lengths)
    rows = [_prompt(models, n, cfg.seed + 100 + i) for i, n in enumerate(lengths)]
    refs = [decoding.greedy(models.ref, row, cfg.batch_steps) for row in rows]  # each prompt alone, unpadded
    targets = torch.cat([tokens for tokens, _ in refs], dim=0)
    ids = torch.zeros(len(lengths), width, dtype=torch.long, device=models.device)
    mask = torch.zeros_like(ids)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids[i, width - n:] = row[0]
        mask[i, width - n:] = 1
    sdpa_logits, _, _ = decoding.teacher_force(models.sdpa(), ids, targets, mask=mask, chunk=cfg.chunk_batch)
    fc_logits, _, fc_prefill = decoding.teacher_force(models.flashcore(), ids, targets, mask=mask,
                                                      chunk=cfg.chunk_batch, prompt_logits=True)
    checks = [criteria.check_steps(fc_logits[i].cpu(), sdpa_logits[i].cpu(), refs[i][1][0].cpu())
              for i in range(len(lengths))]
    finite = bool(torch.isfinite(fc_prefill).all()) and bool(torch.isfinite(fc_logits).all())
    passed = finite and all(c.passed for c in checks)
    measured = {"lengths": ",".join(map(str, lengths)), "steps": cfg.batch_steps, "no_nan_anywhere": finite,
                "teacher_forcing_chunk": cfg.chunk_batch}
    for i, c in enumerate(checks):
        measured.update({f"row{i}_max_err_flashcore": c.max_err_flashcore, f"row{i}_max_err_sdpa": c.max_err_sdpa,
                         f"row{i}_worst_err_over_bound": c.worst_ratio,
                         f"row{i}_confident_top1_mismatches": len(c.confident_mismatches), f"row{i}_passed": c.passed})
    summary = (f"{sum(c.passed for c in checks)}/{len(checks)} rows within bounds (worst err/bound "
               f"{max(c.worst_ratio for c in checks):.2f}); logits finite everywhere incl. padding: {finite}")
    detail = "; ".join(f"row {i}: {_step_detail(c)}" for i, c in enumerate(checks) if not c.passed)
    return _result("batch_4", f"Batch of {len(lengths)} left-padded prompts of lengths {lengths}", passed,
                   "per row, against that prompt run alone in fp32: " + STEP_CRITERION, measured, summary, detail)


REFERENCE = "fp32 copy of the same weights (upcast, exact), eager attention, whole model on the same device"


def run_scenario(name: str, models: Models, cfg: SuiteConfig) -> ScenarioResult:
    if name == "single_token":
        result = single_token(models, cfg)
    elif name == "generate_50":
        result = generate(models, cfg, cfg.gen_short, cfg.chunk_short, name)
    elif name == "generate_200":
        result = generate(models, cfg, cfg.gen_long, cfg.chunk_long, name)
    elif name == "gqa_memory":
        result = gqa_memory(models, cfg)
    elif name == "batch_4":
        result = batch_4(models, cfg)
    else:
        raise ValueError(f"unknown scenario {name!r}")
    if name != "gqa_memory":
        result.measured["reference"] = REFERENCE
    return result
