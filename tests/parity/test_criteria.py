"""The parity criteria on hand-made logits (pure, fast)."""

from __future__ import annotations

import pytest
import torch

from flashcore.parity import criteria
from flashcore.parity.decoding import prompt_pieces, segments


def _ref(steps=6, vocab=50, seed=0):
    return torch.randn(steps, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _noise(ref, scale, seed):
    return ref + scale * torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))


def test_within_twice_sdpa_noise_passes():
    ref = _ref()
    check = criteria.check_steps(_noise(ref, 0.01, 1), _noise(ref, 0.01, 2), ref)
    assert check.passed and check.worst_ratio < 1


def test_a_step_where_sdpa_lands_close_by_chance_is_no_failure():
    """The budget is SDPA's largest error over the check: one lucky SDPA step does not make ordinary rounding at
    that step a failure (the per-step rule of the /1 suite did)."""
    ref = _ref(steps=20)
    sdpa = _noise(ref, 0.01, 2)
    sdpa[7] = ref[7]                                   # SDPA exactly right at step 7, by chance
    fc = _noise(ref, 0.01, 1)
    check = criteria.check_steps(fc, sdpa, ref)
    assert check.passed and check.worst_ratio < 1


def test_error_far_above_sdpa_noise_fails():
    ref = _ref()
    check = criteria.check_steps(_noise(ref, 0.2, 1), _noise(ref, 0.01, 2), ref)
    assert not check.passed and check.bound_violations and check.worst_ratio > 1


def test_nan_fails_and_counts_as_infinite_error():
    ref = _ref()
    fc = ref.clone()
    fc[2, 3] = float("nan")
    check = criteria.check_steps(fc, _noise(ref, 0.01, 2), ref)
    assert not check.passed and not check.finite and 2 in check.bound_violations


def test_non_finite_sdpa_is_no_yardstick():
    """A NaN in SDPA's logits would make the bound infinite; the check must not pass vacuously."""
    ref = _ref()
    sdpa = _noise(ref, 0.01, 2)
    sdpa[1, 0] = float("nan")
    check = criteria.check_steps(ref.clone(), sdpa, ref)
    assert not check.sdpa_finite and not check.passed and "yardstick" in check.detail()


def test_near_tie_flip_is_excused_but_confident_flip_is_not():
    ref = torch.zeros(2, 4)
    ref[0, :2] = torch.tensor([1.0, 0.9995])   # near-tie at step 0
    ref[1, :2] = torch.tensor([5.0, 1.0])      # confident at step 1
    sdpa = ref + 1e-3
    tie_flip = ref.clone()
    tie_flip[0, :2] = torch.tensor([0.9995, 1.0])
    check = criteria.check_steps(tie_flip, sdpa, ref)
    assert check.confident_steps == 1 and not check.confident_mismatches and check.passed
    confident_flip = ref.clone()
    confident_flip[1, :2] = torch.tensor([1.0, 5.0])
    assert criteria.check_steps(confident_flip, sdpa, ref).confident_mismatches == [1]


def test_many_near_tie_flips_while_sdpa_agrees_are_not_a_failure():
    """The /1 suite's false alarm: SDPA agreed with the reference on every step, flashcore lost two near-ties
    (margins far inside the bound). Agreement is information now, not a criterion."""
    steps = 200
    ref = _ref(steps=steps, vocab=8, seed=3)
    ref[:, 0] = ref.amax(-1) + 2.0                    # token 0 on top everywhere ...
    ref[:, 1] = ref[:, 0] - 1.0                       # ... token 1 a clear runner-up ...
    ref[:2, 1] = ref[:2, 0] - 5e-4                    # ... except two near-ties
    sdpa = ref + 1e-3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).abs().clamp(max=0.5)
    fc = ref.clone()
    fc[:2, 0], fc[:2, 1] = ref[:2, 1], ref[:2, 0]     # flashcore flips both near-ties (moves logits by 5e-4)
    check = criteria.check_steps(fc, sdpa, ref)
    assert check.agree_flashcore == pytest.approx(198 / 200) and check.agree_sdpa == 1.0
    assert check.passed and not check.confident_mismatches


def test_confident_means_no_error_within_the_bound_can_flip_it():
    """Exhaustively on random logits: whenever flashcore stays within the bound, a confident step keeps its
    argmax, so the top-1 criterion can never fail a kernel the bound accepts."""
    for seed in range(50):
        ref = _ref(steps=20, vocab=30, seed=seed)
        sdpa = _noise(ref, 0.3, seed + 100)
        bound, _ = criteria.bound_of(sdpa, ref)
        worst_case = ref.clone()  # push the top-1 down and every other logit up by just under the bound
        top = ref.argmax(-1)
        worst_case += 0.999 * bound
        worst_case[torch.arange(20), top] -= 2 * 0.999 * bound
        check = criteria.check_steps(worst_case, sdpa, ref)
        assert not check.bound_violations and not check.confident_mismatches


def test_free_running_divergence_is_reported_with_the_reference_margin():
    logits_a = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0], [3.0, 2.9, 0, 0, 0, 0, 0]])
    logits_b = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0], [2.9, 3.0, 0, 0, 0, 0, 0]])
    same = criteria.check_free_running(torch.tensor([0, 0]), logits_a, torch.tensor([0, 0]), logits_a)
    assert same.diverged_at is None
    parted = criteria.check_free_running(torch.tensor([0, 0]), logits_a, torch.tensor([0, 1]), logits_b)
    assert parted.diverged_at == 1 and parted.ref_margin == pytest.approx(0.1) and parted.in_each_other_top_k
    wild = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 0, 9]])
    assert not criteria.check_free_running(torch.tensor([0, 0]), logits_a, torch.tensor([0, 6]), wild,
                                           k=2).in_each_other_top_k


@pytest.mark.parametrize("total,chunk,expected", [(4, 1, [1, 1, 1, 1]), (7, 4, [3, 1, 2, 1]), (1, 5, [1]),
                                                  (0, 3, [])])
def test_teacher_forcing_segments(total, chunk, expected):
    assert segments(total, chunk) == expected
    assert sum(segments(total, chunk)) == total


@pytest.mark.parametrize("length,chunk,expected", [(10, None, [10]), (10, 4, [4, 4, 2]), (10, 10, [10]),
                                                   (320, 128, [128, 128, 64])])
def test_prompt_pieces(length, chunk, expected):
    assert prompt_pieces(length, chunk) == expected
