"""compiled_decode_blocks: single-token forwards through compiled RMSNorm / SwiGLU / rotary functions give the
model's own logits, prefill keeps the model's code, and leaving the block restores the model."""

from __future__ import annotations

import pytest
import torch

from flashcore.integrations import replace_llama_attention_with_flashcore
from flashcore.integrations.compiled import compiled_decode_blocks
from flashcore.models import load_model
from flashcore.parity import decoding


class _CountingBackend:
    """A torch.compile backend that runs the traced graph as it is and records which functions were compiled."""

    def __init__(self):
        self.graphs: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(" ".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
        return gm.forward


def _decode_logits(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill the prompt, then `steps` greedy single-token forwards; returns their logits [1, steps, V]."""
    cache = decoding.new_cache(model)
    token = decoding.forward(model, prompt, cache, None, None)[:, -1:].argmax(-1)
    out = []
    for _ in range(steps):
        logits = decoding.forward(model, token, cache, None, None)
        out.append(logits)
        token = logits[:, -1:].argmax(-1)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["tiny", "tiny-mistral", "tiny-qwen2"])
@torch.no_grad()
def test_compiled_blocks_give_the_models_logits(name, device):
    model = replace_llama_attention_with_flashcore(load_model(name, device=device, dtype=torch.float32).model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3)).to(device)
    ref = _decode_logits(model, prompt, 3)
    backend = _CountingBackend()
    layers = model.config.num_hidden_layers
    with compiled_decode_blocks(model, backend=backend) as counts:
        got = _decode_logits(model, prompt, 3)
    assert counts == {"rms_norm": 2 * layers + 1, "mlp": layers, "rope": 1}
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # one graph per function (decode shape only: the 12-token prefill ran the model's own code), shared by layers
    assert len(backend.graphs) == 3, backend.graphs
    assert any("rsqrt" in g for g in backend.graphs) and any("silu" in g for g in backend.graphs)
    assert any("cat" in g for g in backend.graphs)
    # restored: no instance forward left, the module's rotary function is the original again
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(_decode_logits(model, prompt, 3), ref)


@pytest.mark.gpu
@torch.no_grad()
def test_compiled_blocks_in_a_cuda_graph_step():
    """Inductor on the GPU: a decode step captured in a CUDA graph with the compiled blocks, fed the tokens of plain
    eager static-cache decoding, replays to that decoding's logits (bf16: within 2% of the logit scale)."""
    from flashcore.parity.decoding import static_cache as _static_cache, step_kwargs as _step_kwargs
    model = replace_llama_attention_with_flashcore(load_model("tiny", device="cuda", dtype=torch.bfloat16).model)
    prompt = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1)).to("cuda")
    positions = torch.arange(40, device="cuda").view(1, -1)

    def prefilled():
        cache = _static_cache(model, 64)
        logits = model(prompt, **{**_step_kwargs(model, cache, positions), "logits_to_keep": 1}).logits
        return cache, logits[:, -1:].argmax(-1)

    ref_cache, token = prefilled()
    ref_tokens, ref_logits = [token.clone()], []
    for step in range(5):
        pos = torch.full((1, 1), 40 + step, device="cuda")
        ref_logits.append(model(ref_tokens[-1], **_step_kwargs(model, ref_cache, pos)).logits[:, -1].float())
        ref_tokens.append(ref_logits[-1].argmax(-1, keepdim=True))
    with compiled_decode_blocks(model):
        cache, token = prefilled()
        position = torch.full((1, 1), 40, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile outside the capture, on a scratch cache
            model(token.clone(), **_step_kwargs(model, _static_cache(model, 64), position.clone()))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(token, **_step_kwargs(model, cache, position)).logits[:, -1].float()
            position.add_(1)
        for step in range(5):
            token.copy_(ref_tokens[step])
            graph.replay()
            err = (out - ref_logits[step]).abs().max().item()
            assert err <= 0.02 * ref_logits[step].abs().max().item(), (step, err)
