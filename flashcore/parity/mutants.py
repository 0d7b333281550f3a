"""A catalogue of plausible kernel bugs, each applied to a copy of the real kernel source: the suite must fail
every one of them (tests/parity/test_suite_can_fail.py; the full table: benchmarks/parity_mutants.py).

    kernels = load(CATALOGUE["decode_merge_no_rescale"])     # a Kernels pair with that one bug
    run_suite("tiny", kernels=kernels, ...)                   # -> passed is False

Classic mutation testing: a mutant is one or two regex edits of flashcore/ops/<file>.py (each must match exactly
once), written to a temporary module next to nothing else and imported; the copy registers its torch custom ops
under its own namespace and imports the real helpers, so nothing of the real kernels is touched. When a kernel
is rewritten and an edit no longer matches, load() raises MutantStale naming it: update the pattern to the new
code (the bug it describes stays the same), never drop the mutant.
"""

from __future__ import annotations

import atexit
import importlib.util
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import flashcore.ops
from flashcore.parity.scenarios import Kernels

OPS_DIR = Path(flashcore.ops.__file__).parent
KERNEL_FILES = ("prefill", "decode")


class MutantStale(RuntimeError):
    """An edit of a mutant no longer matches the kernel source exactly once."""


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str                                  # what is wrong, in words
    file: str                                 # "prefill" | "decode" | "_common" (both kernels import it)
    edits: tuple[tuple[str, str], ...]        # (regex, replacement), each matching exactly once
    catches: tuple[str, ...]                  # scenarios expected to fail (the CI test runs only these), at
                                              # CPU and GPU sizes alike: split bugs need several splits of the
                                              # GPU's >= 256-key chunks, hence long_context for decode


CATALOGUE_LIST = (
    # -- prefill (FlashAttention-2 forward) -------------------------------------------------------------------
    Mutant("prefill_scale_no_log2e", "prefill: softmax scale without the log2(e) factor (exp2 of natural-log scores)",
           "prefill", ((r"sm_scale \* LOG2E", "sm_scale"),), ("single_token",)),
    Mutant("prefill_causal_excludes_diagonal", "prefill: causal mask j < i (a query cannot see its own key)",
           "prefill", ((r"offs_j\[None, :\] <= offs_m_key\[:, None\]", "offs_j[None, :] < offs_m_key[:, None]"),),
           ("single_token",)),
    Mutant("prefill_causal_sees_next", "prefill: causal mask off by one in the query offset (query i sees key i+1)",
           "prefill", ((r"offs_m_key = q_off \+ offs_m\b", "offs_m_key = q_off + offs_m + 1"),), ("single_token",)),
    Mutant("prefill_gqa_tiled", "prefill: GQA head mapping tiled (h % Hkv) instead of grouped (h // group)",
           "prefill", ((r"kvh = h // GROUP", "kvh = h % (HQ // GROUP)"),), ("single_token",)),
    Mutant("prefill_left_pad_edge_unmasked", "prefill: the key block holding the left-padding edge runs unmasked "
           "(pad keys leak)", "prefill",
           ((r"full_lo = tl\.cdiv\(kv_lo, BLOCK_N\) \* BLOCK_N", "full_lo = (kv_lo // BLOCK_N) * BLOCK_N"),),
           ("batch_4",)),
    Mutant("prefill_tile_keys_of_first_tile", "prefill: every query tile's key range ends where the first tile's "
           "does (tile offset forgotten: only prompts longer than one tile show it)", "prefill",
           ((r"q_off \+ pid_m \* BLOCK_M \+ BLOCK_M\)", "q_off + BLOCK_M)"),), ("single_token",)),
    Mutant("prefill_unmasked_past_diagonal", "prefill: the unmasked key blocks reach the tile's last query instead "
           "of its first (future keys leak into a tile)", "prefill",
           ((r"q_off \+ pid_m \* BLOCK_M \+ 1\)", "q_off + pid_m * BLOCK_M + BLOCK_M)"),), ("single_token",)),
    Mutant("prefill_acc_not_rescaled", "prefill: online softmax does not rescale the accumulator when the running "
           "max grows", "prefill", ((r"acc = acc \* alpha\[:, None\]\n", "acc = acc\n"),), ("single_token",)),
    Mutant("prefill_denominator_not_rescaled", "prefill: online softmax does not rescale the denominator",
           "prefill", ((r"l_i = l_i \* alpha \+ tl\.sum\(p, 1\)", "l_i = l_i + tl.sum(p, 1)"),), ("single_token",)),
    Mutant("prefill_no_max_subtraction", "prefill: softmax without max-subtraction (exp of raw scores overflows "
           "past ~88)", "prefill",
           ((r"m_new = tl\.maximum\(m_i, tl\.max\(qk, 1\)\)", "m_new = tl.maximum(m_i, 0.0 * tl.max(qk, 1))"),
            (r"m_new = tl\.maximum\(m_i, tl\.max\(qk, 1\) \* qk_scale\)",
             "m_new = tl.maximum(m_i, 0.0 * tl.max(qk, 1))")),
           ("large_scores",)),
    # -- decode (split-K flash-decoding) -----------------------------------------------------------------------
    Mutant("decode_scale_no_log2e", "decode: softmax scale without the log2(e) factor", "decode",
           ((r"sm_scale \* LOG2E", "sm_scale"),), ("long_context",)),
    Mutant("decode_gqa_strided", "decode: a KV head serves query heads kvh + i * Hkv instead of kvh * group + i",
           "decode", ((r"heads = kvh \* GROUP \+ offs_h\b", "heads = kvh + offs_h * HKV"),), ("long_context",)),
    Mutant("decode_merge_no_rescale", "decode: splits merged by a plain average (no log-sum-exp weights)", "decode",
           ((r"w = tl\.math\.exp2\(lse - m_shift(\[:, None\])?\)", 'w = tl.where(lse == float("-inf"), 0.0, 1.0)'),),
           ("long_context",)),
    Mutant("decode_split_drops_last_key", "decode: each split stops one key short of the next (boundary key lost)",
           "decode", ((r"hi = tl\.minimum\(lo \+ CHUNK, kv_hi\)", "hi = tl.minimum(lo + CHUNK - 1, kv_hi)"),),
           ("long_context",)),
    Mutant("decode_reads_past_valid_length", "decode: one slot past the valid length is read (a static cache's "
           "garbage)", "decode",
           ((r"kv_hi = tl\.minimum\(tl\.load\(KVLens \+ b\)\.to\(tl\.int32\), S_MAX\)",
             "kv_hi = tl.minimum(tl.load(KVLens + b).to(tl.int32) + 1, S_MAX)"),), ("static_cache",)),
    Mutant("decode_left_pad_ignored", "decode: keys before kv_start inside the first block are not masked (pad "
           "keys leak into decode steps)", "decode",
           ((r"valid_j = \(offs_j >= kv_lo\) & \(offs_j < hi\)", "valid_j = offs_j < hi"),), ("batch_4",)),
    Mutant("decode_denominator_not_rescaled", "decode: online softmax does not rescale the denominator", "decode",
           ((r"l_i = l_i \* alpha \+ tl\.sum\(p, 1\)", "l_i = l_i + tl.sum(p, 1)"),), ("long_context",)),
    # -- shared ------------------------------------------------------------------------------------------------
    Mutant("default_scale_one_over_d", "launchers: default softmax scale 1/D instead of 1/sqrt(D)", "_common",
           ((r"else 1\.0 / math\.sqrt\(head_dim\)", "else 1.0 / head_dim"),), ("default_scale",)),
)
CATALOGUE: dict[str, Mutant] = {m.name: m for m in CATALOGUE_LIST}

_LOADED: dict[str, Kernels] = {}
_DIR: list[Path] = []  # the temporary folder of this process's mutant modules, removed at exit


def mutate(source: str, mutant: Mutant) -> str:
    """The source with the mutant's edits applied (each regex must match exactly once)."""
    for pattern, replacement in mutant.edits:
        found = len(re.findall(pattern, source))
        if found != 1:
            raise MutantStale(f"mutant {mutant.name}: {pattern!r} matches {found} times in "
                              f"flashcore/ops/{mutant.file}.py (expected once): update it to the kernel's code")
        source = re.sub(pattern, lambda _: replacement, source)
    return source


def _import(module_name: str, source: str):
    if not _DIR:
        _DIR.append(Path(tempfile.mkdtemp(prefix="flashcore-mutants-")))
        atexit.register(shutil.rmtree, _DIR[0], True)
    path = _DIR[0] / f"{module_name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton resolves a jit function's globals through its module
    spec.loader.exec_module(module)
    return module


def _copy(file: str, tag: str, source: str, common: str | None):
    source = source.replace('"flashcore::', f'"flashcore_{tag}::')  # its own custom-op namespace
    if common:
        source = source.replace("from flashcore.ops._common import", f"from {common} import")
    return _import(f"flashcore_mutant_{tag}_{file}", source)


def load(mutant: Mutant) -> Kernels:
    """The kernels with `mutant`'s bug (imported once per process)."""
    if mutant.name in _LOADED:
        return _LOADED[mutant.name]
    tag = re.sub(r"\W", "_", mutant.name)
    sources = {f: (OPS_DIR / f"{f}.py").read_text() for f in (*KERNEL_FILES, "_common")}
    common = None
    if mutant.file == "_common":
        common = _copy("_common", tag, mutate(sources["_common"], mutant), None).__name__
    modules = {f: _copy(f, tag, mutate(sources[f], mutant) if f == mutant.file else sources[f], common)
               if f == mutant.file or common else None for f in KERNEL_FILES}
    real = Kernels.default()
    kernels = Kernels(prefill=modules["prefill"].prefill_attention if modules["prefill"] else real.prefill,
                      decode=modules["decode"].decode_attention if modules["decode"] else real.decode)
    _LOADED[mutant.name] = kernels
    return kernels
