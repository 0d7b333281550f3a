"""flashcore: Triton attention kernels for LLaMA-class models (causal prefill, KV-cache decode, GQA)."""

__version__ = "0.1.0"
