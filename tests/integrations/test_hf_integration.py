"""The transformers drop-in on tiny random Llama / Mistral / Qwen2 models: every cache and mask case transformers
produces, checked against the same model on PyTorch SDPA, in fp32: on the CPU (the kernels interpreted) or, on a
host with CUDA, on the GPU (there Triton compiles for GPU tensors only)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from flashcore.integrations import (NAME, get_flashcore_attention_stats, load_llama_with_flashcore,
                                    replace_llama_attention_with_flashcore, reset_flashcore_attention_stats,
                                    restore_sdpa_attention)
from flashcore.integrations import masks
from flashcore.models import ModelLoadError, ModelPreset, load_model

FAMILIES = ["tiny", "tiny-mistral", "tiny-qwen2"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model(name: str, device: str = DEV, dtype=torch.float32):
    return load_model(name, device=device, dtype=dtype).model


def _left_padded_batch(vocab: int, lengths: list[int], device=DEV, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def _both(model, fn):
    """fn(model) on SDPA, then on flashcore; returns (sdpa_result, flashcore_result)."""
    restore_sdpa_attention(model)
    ref = fn(model)
    replace_llama_attention_with_flashcore(model)
    return ref, fn(model)


# -- the mask description (pure) --------------------------------------------------------------------------

def test_description_is_none_for_plain_causal():
    assert masks.build_description(2, 5, 5, 0, None, "cpu") is None
    assert masks.build_description(2, 4, 9, 5, None, "cpu") is None  # chunk onto a DynamicCache


def test_decode_description_carries_kv_lens():
    q_off, start, end = masks.unpack_description(masks.build_description(2, 1, 9, 8, None, "cpu"))
    assert q_off.tolist() == [8, 8] and start.tolist() == [0, 0] and end.tolist() == [9, 9]


def test_description_rows_for_left_padding_and_static_cache():
    pad = torch.tensor([[False, False, True, True], [True, True, True, True]])
    offset = torch.tensor(4)  # a StaticCache's live counter
    desc = masks.build_description(2, 1, 16, offset, pad, "cpu")
    assert masks.is_description(desc)
    q_off, start, end = masks.unpack_description(desc)
    assert q_off.tolist() == [4, 4] and start.tolist() == [2, 0] and end.tolist() == [5, 5]
    assert start.is_contiguous() and end.is_contiguous()
    offset.add_(1)  # the cache increments its counter in place during the forward
    assert masks.unpack_description(desc)[0].tolist() == [4, 4]


def test_left_padding_check_rejects_holes():
    assert masks.is_left_padded(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]).bool())
    assert not masks.is_left_padded(torch.tensor([[1, 0, 1, 1]]).bool())
    assert not masks.is_left_padded(torch.tensor([[1, 1, 0, 0]]).bool())


def test_dense_masks_are_not_descriptions():
    assert not masks.is_description(torch.ones(2, 1, 3, 3, dtype=torch.bool))
    assert not masks.is_description(None)


# -- whole models (the CPU, or the GPU where there is one) ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_prefill_and_generate_match_sdpa(name):
    model = _model(name)
    ids, mask = _left_padded_batch(model.config.vocab_size, [7, 12])
    with torch.no_grad():
        ref, out = _both(model, lambda m: m(ids, attention_mask=mask).logits)
        valid = mask.bool()
        torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
        assert torch.isfinite(out).all()  # padded query rows see no key: exact zeros, never NaN
        gen = lambda m: m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # noqa: E731
        ref_tokens, tokens = _both(model, gen)
    assert torch.equal(tokens, ref_tokens)
    total = get_flashcore_attention_stats(model).total
    layers = model.config.num_hidden_layers
    assert total.prefill_calls == 2 * layers and total.decode_calls == 3 * layers and total.fallback_calls == 0


def test_static_cache_generate_matches_sdpa():
    model = _model("tiny")
    ids, mask = _left_padded_batch(model.config.vocab_size, [5, 11], seed=1)
    gen = lambda m: m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,  # noqa: E731
                               cache_implementation="static")
    with torch.no_grad():
        ref_tokens, tokens = _both(model, gen)
    assert torch.equal(tokens, ref_tokens)
    if DEV == "cpu":  # on a GPU transformers compiles a static cache's decode step, which the stats don't count
        assert get_flashcore_attention_stats(model).total.decode_calls > 0


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_prefill_onto_existing_cache_then_decode(cache_kind):
    model = _model("tiny")
    g = torch.Generator().manual_seed(2)
    prompt, chunk, step = (torch.randint(0, 512, (1, n), generator=g).to(DEV) for n in (9, 6, 1))

    def run(m):
        if cache_kind == "dynamic":
            cache = DynamicCache(config=m.config)
        else:
            cache = StaticCache(config=m.config, max_cache_len=32)
        m(prompt, past_key_values=cache, use_cache=True)
        chunk_logits = m(chunk, past_key_values=cache, use_cache=True).logits  # Sq=6 onto 9 cached keys
        step_logits = m(step, past_key_values=cache, use_cache=True).logits    # single-token decode
        return torch.cat([chunk_logits, step_logits], dim=1)

    with torch.no_grad():
        ref, out = _both(model, run)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    total = get_flashcore_attention_stats(model).total
    assert total.prefill_tokens == (9 + 6) * 2 and total.decode_tokens == 2


def test_mask_with_holes_falls_back_to_sdpa_not_silently_wrong():
    model = _model("tiny")
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(3)).to(DEV)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]], device=DEV)
    with torch.no_grad():
        ref, out = _both(model, lambda m: m(ids, attention_mask=mask).logits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    total = get_flashcore_attention_stats(model).total
    assert total.fallback_calls == 2 and total.prefill_calls == 0


def test_sliding_window_falls_back_to_sdpa():
    """Mistral with a window shorter than the sequence: flashcore cannot express the window, so SDPA runs."""
    from flashcore.models import ModelPreset, build_model
    preset = ModelPreset.from_name("tiny-mistral")
    preset.extra = {"sliding_window": 4}
    model = build_model(preset, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = _both(model, lambda m: m(ids).logits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    total = get_flashcore_attention_stats(model).total
    assert total.fallback_calls == model.config.num_hidden_layers and total.prefill_calls == 0


def test_switch_back_to_sdpa_and_reset_stats():
    model = _model("tiny")
    replace_llama_attention_with_flashcore(model)
    assert model.config._attn_implementation == NAME
    ids = torch.randint(0, 512, (1, 5), device=DEV)
    with torch.no_grad():
        model(ids)
    assert get_flashcore_attention_stats(model).layers[0].prefill_calls == 1
    restore_sdpa_attention(model)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        model(ids)
    assert get_flashcore_attention_stats(model).total.calls == 2  # SDPA calls are not counted
    reset_flashcore_attention_stats(model)
    assert get_flashcore_attention_stats(model).total.calls == 0


def test_from_pretrained_with_attn_implementation(tmp_path):
    model = _model("tiny-qwen2")
    model.save_pretrained(tmp_path)
    replace_llama_attention_with_flashcore(model)  # registers the backend
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME, dtype=torch.float32).to(DEV)
    assert loaded.config._attn_implementation == NAME
    ids = torch.randint(0, 512, (1, 6), device=DEV)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert get_flashcore_attention_stats(loaded).total.prefill_calls == 2


def test_load_llama_with_flashcore():
    model = load_llama_with_flashcore("tiny", device=DEV, dtype=torch.float32)
    assert model.config._attn_implementation == NAME
    with torch.no_grad():
        tokens = model.generate(torch.randint(0, 512, (1, 6), device=DEV), max_new_tokens=3, do_sample=False)
    assert tokens.shape == (1, 9)
    assert get_flashcore_attention_stats(model).total.decode_calls == 2 * model.config.num_hidden_layers


# -- presets and loading ----------------------------------------------------------------------------------

def test_presets():
    big = ModelPreset.from_name("llama-3.1-8b")
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads, big.head_dim) == (4096, 32, 32, 8, 128)
    assert big.vocab_size == 128256 and big.rope_theta == 500000.0 and big.group == 4
    config = big.hf_config()
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    tiny = ModelPreset.from_name("tiny")
    assert tiny.num_layers <= 4 and tiny.group > 1


def test_preset_weights_are_deterministic():
    a = _model("tiny").model.layers[0].self_attn.q_proj.weight
    b = _model("tiny").model.layers[0].self_attn.q_proj.weight
    assert torch.equal(a, b)


def test_unknown_preset_and_unreachable_hub_fail_in_one_line(monkeypatch):
    with pytest.raises(ModelLoadError, match="unknown model preset"):
        load_model("no-such-preset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without the hub sees; the probe is skipped
    with pytest.raises(ModelLoadError) as info:
        load_model("meta-llama/Llama-3.1-8B", device="cpu", token="hf_not_a_real_token")
    assert "\n" not in str(info.value) and "hf_not_a_real_token" not in str(info.value)


# -- GPU: bf16 and CUDA-graph capture ---------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_graph_decode_step_over_static_cache():
    """A decode step captured as a CUDA graph over a StaticCache replays to the same tokens as eager decoding."""
    from flashcore.parity.decoding import static_cache as _static_cache, step_kwargs as _step_kwargs
    model = _model("tiny", device="cuda", dtype=torch.bfloat16)
    replace_llama_attention_with_flashcore(model)
    prompt = torch.randint(0, 512, (1, 40), device="cuda")
    positions = torch.arange(40, device="cuda").view(1, -1)

    def prefilled():
        cache = _static_cache(model, 64)
        logits = model(prompt, **{**_step_kwargs(model, cache, positions), "logits_to_keep": 1}).logits
        return cache, logits[:, -1:].argmax(-1)

    with torch.no_grad():
        ref_cache, t = prefilled()
        pos = torch.full((1, 1), 40, device="cuda")
        ref_tokens = []
        for _ in range(5):
            t = model(t, **_step_kwargs(model, ref_cache, pos)).logits[:, -1:].argmax(-1)
            ref_tokens.append(t.item())
            pos = pos + 1
        cache, token = prefilled()
        position = torch.full((1, 1), 40, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # the kernels were compiled by the eager steps above
            out = model(token, **_step_kwargs(model, cache, position)).logits
            token.copy_(out[:, -1:].argmax(-1))
            position.add_(1)
        got = []
        for _ in range(5):
            graph.replay()
            got.append(token.item())
    assert got == ref_tokens


@pytest.mark.gpu
def test_generate_static_cache_auto_compile_on_gpu():
    """generate() with a StaticCache compiles the decode step (torch.compile) on a GPU: the custom ops trace."""
    model = _model("tiny", device="cuda", dtype=torch.float32)
    ids, mask = _left_padded_batch(model.config.vocab_size, [6, 10], device="cuda", seed=4)
    with torch.no_grad():
        ref = lambda m: m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)  # noqa: E731
        ref_tokens, _ = _both(model, ref)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                cache_implementation="static")
    assert torch.equal(tokens, ref_tokens)
