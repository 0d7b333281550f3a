"""Parity criteria that survive low-precision near-ties (pure functions of logits; no models, no I/O).

Three models see the same tokens: flashcore and PyTorch SDPA in the low precision (bf16 on a GPU), and an fp32
reference of the same weights. SDPA's distance to the reference is the noise budget (flash-attention's test rule):

    err_t(x)   = max_v |logits_x[t, v] - logits_ref[t, v]|                       per step t
    eps        = max(EPS_REL * max|logits_ref|, EPS_NOISE * median_t err_t(sdpa))
    bound_t    = 2 * err_t(sdpa) + eps;   pass when err_t(flashcore) <= bound_t for every t
    confident  = steps whose reference top-1 margin exceeds 2 * bound_t: there no error within the bound can flip
                 the argmax, so flashcore's top-1 must equal the reference's (near-ties are excused)
    agreement  = top-1 agreement with the reference of flashcore >= that of SDPA - slack,
                 slack = max(2 * sqrt(p (1 - p) / T), 1 / T) with p = SDPA's agreement (two binomial standard
                 deviations, at least one step): near-ties flip either way, a broken kernel loses far more
    vLLM-style = at the first step where the greedy tokens differ, each side's token is in the other's top-k

The eps floor keeps a step where SDPA happened to land unusually close to the reference from failing flashcore
for ordinary rounding; a wrong mask, scale or head mapping moves logits by far more than either term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch

EPS_REL = 1e-4
EPS_NOISE = 0.5
TOP_K = 5


def step_errors(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[T, V] x [T, V] -> [T] max absolute difference per step (fp32; NaN anywhere gives inf)."""
    diff = (logits.float() - ref.float()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return diff.amax(dim=-1)


def noise_eps(ref: torch.Tensor, sdpa_errors: torch.Tensor) -> float:
    scale = float(ref.float().abs().max())
    return max(EPS_REL * scale, EPS_NOISE * float(sdpa_errors.float().median()))


def top2_margin(ref: torch.Tensor) -> torch.Tensor:
    """[T, V] -> [T] gap between the largest and second-largest logit."""
    top = ref.float().topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


@dataclass
class StepCheck:
    """The per-step comparison of one flashcore run against the fp32 reference, SDPA as the noise yardstick."""
    steps: int
    eps: float
    max_err_flashcore: float
    max_err_sdpa: float
    worst_ratio: float                 # max_t err_fc / bound_t (<= 1 passes)
    bound_violations: list[int] = field(default_factory=list)
    confident_steps: int = 0
    confident_mismatches: list[int] = field(default_factory=list)
    agree_flashcore: float = 0.0       # top-1 agreement with the reference, all steps
    agree_sdpa: float = 0.0
    agree_slack: float = 0.0
    finite: bool = True

    @property
    def agreement_ok(self) -> bool:
        return self.agree_flashcore >= self.agree_sdpa - self.agree_slack - 1e-9

    @property
    def passed(self) -> bool:
        return self.finite and not self.bound_violations and not self.confident_mismatches and self.agreement_ok

    def measured(self, prefix: str = "") -> dict:
        return {f"{prefix}steps": self.steps, f"{prefix}max_err_flashcore": self.max_err_flashcore,
                f"{prefix}max_err_sdpa": self.max_err_sdpa, f"{prefix}eps": self.eps,
                f"{prefix}worst_err_over_bound": self.worst_ratio,
                f"{prefix}bound_violations": len(self.bound_violations),
                f"{prefix}confident_steps": self.confident_steps,
                f"{prefix}confident_top1_mismatches": len(self.confident_mismatches),
                f"{prefix}top1_agree_flashcore": self.agree_flashcore, f"{prefix}top1_agree_sdpa": self.agree_sdpa,
                f"{prefix}top1_agree_slack": self.agree_slack, f"{prefix}finite": self.finite}


def check_steps(flashcore: torch.Tensor, sdpa: torch.Tensor, ref: torch.Tensor) -> StepCheck:
    """flashcore, sdpa, ref: [T, V] logits for the same T steps (same input tokens)."""
    err_fc, err_sdpa = step_errors(flashcore, ref), step_errors(sdpa, ref)
    eps = noise_eps(ref, err_sdpa)
    bound = 2 * err_sdpa + eps
    ratio = err_fc / bound
    margin = top2_margin(ref)
    confident = margin > 2 * bound
    ref_top1 = ref.float().argmax(-1)
    fc_top1, sdpa_top1 = flashcore.float().argmax(-1), sdpa.float().argmax(-1)
    mismatch = confident & (fc_top1 != ref_top1)
    steps = int(ref.shape[0])
    agree_sdpa = float((sdpa_top1 == ref_top1).float().mean())
    return StepCheck(
        steps=steps, eps=eps, max_err_flashcore=float(err_fc.max()), max_err_sdpa=float(err_sdpa.max()),
        worst_ratio=float(ratio.max()), bound_violations=torch.nonzero(err_fc > bound).flatten().tolist(),
        confident_steps=int(confident.sum()), confident_mismatches=torch.nonzero(mismatch).flatten().tolist(),
        agree_flashcore=float((fc_top1 == ref_top1).float().mean()),
        agree_sdpa=agree_sdpa, agree_slack=agreement_slack(agree_sdpa, steps),
        finite=bool(torch.isfinite(flashcore.float()).all()))


def agreement_slack(p: float, steps: int) -> float:
    """How far below SDPA's top-1 agreement p (over `steps` steps) flashcore's may fall: 2 binomial sd, >= 1 step."""
    return max(2 * math.sqrt(p * (1 - p) / steps), 1 / steps) if steps else 0.0


@dataclass
class FreeRunCheck:
    """vLLM's check_logprobs_close: greedy runs may part on a near-tie, but only between plausible tokens."""
    diverged_at: int | None            # first step whose greedy tokens differ (None: identical)
    token_a: int | None = None
    token_b: int | None = None
    a_in_b_topk: bool = True
    b_in_a_topk: bool = True

    @property
    def passed(self) -> bool:
        return self.a_in_b_topk and self.b_in_a_topk


def check_free_running(tokens_a: torch.Tensor, logits_a: torch.Tensor, tokens_b: torch.Tensor,
                       logits_b: torch.Tensor, k: int = TOP_K) -> FreeRunCheck:
    """tokens_*: [T] greedy tokens; logits_*: [T, V] the logits each was chosen from (same prefix up to the first
    difference). At the first differing step, each token must be in the other side's top-k."""
    differ = torch.nonzero(tokens_a != tokens_b).flatten()
    if differ.numel() == 0:
        return FreeRunCheck(diverged_at=None)
    t = int(differ[0])
    a, b = int(tokens_a[t]), int(tokens_b[t])
    top_a = logits_a[t].float().topk(k).indices.tolist()
    top_b = logits_b[t].float().topk(k).indices.tolist()
    return FreeRunCheck(diverged_at=t, token_a=a, token_b=b, a_in_b_topk=a in top_b, b_in_a_topk=b in top_a)
