"""Reward models: a scalar head on a language model, saved and loaded as a directory; several combined.

A reward model answers "how good is this completion for this prompt" with one number, through the same
`score(prompts, completions, references=None) -> [N]` method as the rule-based verifiers (`Scorer` in
`rewards/scorer.py`; a reward model ignores references), so PPO, GRPO, best-of-N and evaluation take
either.

- `RewardModel`: a linear head `r = w·h + b` on one hidden state of a backbone. For a causal LM (the
  InstructGPT / Llama 2 reward model) `h` is the last non-padding token's final hidden state, the only
  position that has seen the whole prompt and response (read at each sequence's last token when the
  sequences are packed into rows without padding, `packing`); for an encoder (BERT-like) it is the first ([CLS])
  token or the mean over tokens. The LM head is never run: only the decoder body is called.
- Normalisation (Ziegler et al. 2019, InstructGPT): after training, a gain and bias are fitted so the
  rewards of a reference set of responses have mean 0 and std 1. `score` applies them; training and
  calibration use the raw rewards, on which the Bradley-Terry probabilities σ(r_a − r_b) are defined.
- `CombinedReward`: several scorers as one: weighted sum, ensemble mean, ensemble minimum (a pessimistic
  ensemble resists reward hacking: the policy must fool every member), and Llama 2's helpfulness/safety rule.

On disk (`OUTPUT/model/`): the backbone in Hugging Face format (LoRA merged; loadable by plain
`transformers`) with its tokenizer, `reward_head.safetensors` (weight [1, H], bias [1]) and
`reward_model.json` (backbone kind, pooling, normalisation), written last so its presence means complete.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from alignkit.config import read_yaml_config
from alignkit.data.records import Prompt
from alignkit.data.tokenize import IGNORE, Example, collate, collate_packed, encode_prompt_completion
from alignkit.errors import AlignkitError
from alignkit.fused import lean_activations
from alignkit.io import write_json
from alignkit.logprobs import attention_input, keeps_packed_sequences_apart
from alignkit.models import LoraSettings, apply_lora, enable_activation_checkpointing, evaluating, load_model, load_tokenizer, resolve, save_model
from alignkit.rewards.scorer import Scorer  # the one scorer interface: score(prompts, completions[, references]) -> [N]

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_model.json"
FORMAT = "alignkit-reward-model"
Backbone = Literal["causal", "encoder"]
Pooling = Literal["last", "cls", "mean"]
DEFAULT_POOLING: dict[str, Pooling] = {"causal": "last", "encoder": "cls"}


def _base(model: nn.Module) -> nn.Module:
    """The `transformers` model under a `peft` wrapper (LoRA layers stay injected inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """One vector per row of `hidden` [B, T, H] -> [B, H].

    `last` takes the last position whose mask is 1 (right or left padding alike); `cls` the first position;
    `mean` the average over unmasked positions.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden[:, -1] if pooling == "last" else hidden.mean(1)
    mask = attention_mask.to(hidden.dtype)
    if pooling == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * attention_mask.long()).argmax(-1)  # the largest unmasked position of each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}")


@dataclass
class Normalisation:
    """`score = (raw - mean) / std`, fitted on `responses` raw rewards of the `source` set."""

    mean: float = 0.0
    std: float = 1.0
    responses: int = 0
    source: str = "none"

    @classmethod
    def fit(cls, raw: torch.Tensor, source: str) -> "Normalisation":
        raw = raw.double()
        std = raw.std(unbiased=False).item() if raw.numel() > 1 else 1.0
        return cls(raw.mean().item(), max(std, 1e-6), raw.numel(), source)


class RewardModel(nn.Module):
    """A backbone plus a scalar head; `forward` gives raw rewards [B], `score` normalised ones [N].

    This module, not the backbone, is what `accelerate.prepare` wraps, so DDP/FSDP see the head and the
    backbone as one computation.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        backbone: Backbone = "causal",
        pooling: Pooling | None = None,
        max_length: int = 512,
        batch_size: int = 16,
        normalisation: Normalisation | None = None,
        packing: bool = True,
    ):
        super().__init__()
        self.name = "rm"  # how logs and error messages of the scorer interface label it
        if backbone not in ("causal", "encoder"):
            raise AlignkitError(f"unknown reward-model backbone {backbone!r}", fix="use causal or encoder")
        self.model = model
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.pooling: Pooling = pooling or DEFAULT_POOLING[backbone]
        self.max_length, self.batch_size = max_length, batch_size
        self.progress = False  # show a progress bar while scoring (the CLI turns it on)
        self.packing = packing  # asked for; `packs()` says whether it is used
        self._isolates: bool | None = None  # the answer of the packing check, once asked
        self.normalisation = normalisation or Normalisation()
        base = _base(model)
        hidden_size = base.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden_size, 1)
        # lm-human-preferences (Ziegler et al. 2019) initialises the reward head with std 1/sqrt(H + 1), so
        # the initial rewards are O(1) whatever the width.
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.head.bias)
        # Parameters that never reach the reward get no gradient; DDP would stop on them as "unused".
        unused: list[nn.Module | None] = []
        if backbone == "causal":
            out, inp = base.get_output_embeddings(), base.get_input_embeddings()
            if out is not None and (inp is None or out.weight is not inp.weight):
                unused.append(out)
        else:
            unused.append(getattr(base, "pooler", None))
        for module in unused:
            if module is not None:
                module.requires_grad_(False)

    def body(self) -> nn.Module:
        base = _base(self.model)
        return base.get_decoder() if self.backbone == "causal" else base

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        ends: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw rewards (fp32): [B] of right-padded rows `input_ids` [B, T], or [N] of the sequences packed in
        them, read at their last tokens `ends` [N] (flat indices into B · T, `collate_packed`)."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.backbone == "causal":
            # Encoders number positions themselves (RoBERTa starts after the padding index), so only the
            # decoder gets the collated position ids.
            kwargs.update(position_ids=position_ids, use_cache=False)
        body = self.body()
        kwargs["attention_mask"] = attention_input(body.config, attention_mask)
        hidden = body(**kwargs).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling) if ends is None else hidden.flatten(0, 1)[ends]
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()

    def packs(self) -> bool:
        """Whether batches are packed: asked for, a causal backbone read at the last token, and attention
        that keeps packed sequences apart."""
        if not (self.packing and self.backbone == "causal" and self.pooling == "last"):
            return False
        if self._isolates is None:
            self._isolates = keeps_packed_sequences_apart(self, self.body())
        return self._isolates

    def shares_prompts(self) -> bool:
        """Whether packed batches can hold a comparison's prompt once for all its answers (`collate_packed_shared`)."""
        return self.packs() and keeps_packed_sequences_apart(self, self.body(), shared_prompts=True)

    # --- tokenisation and scoring -----------------------------------------------------------------------

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """Tokens an encoder expects around its input ([CLS] … [SEP], else BOS … EOS); none for a decoder."""
        if self.backbone == "causal" or self.tokenizer is None:
            return [], []
        tok = self.tokenizer
        first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        last = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        return ([first] if first is not None else []), ([last] if last is not None else [])

    def wrap(self, example: Example) -> Example:
        """Add the encoder's special tokens to an example already cut to `max_length` minus their number."""
        prefix, suffix = self.special_tokens()
        if not prefix and not suffix:
            return example
        ids = prefix + example.input_ids + suffix
        return Example(ids, [IGNORE] * len(ids), example.origin)

    def encode(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[Example]:
        """Chat-template each (prompt, completion) and cut it to `max_length` tokens from the right.

        Unlike training data, nothing is dropped: a completion cut away entirely still gets a reward.
        """
        if self.tokenizer is None:
            raise AlignkitError("this reward model has no tokenizer attached", fix="load it with load_reward_model")
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        prefix, suffix = self.special_tokens()
        room = self.max_length - len(prefix) - len(suffix)
        examples = []
        for prompt, completion in zip(prompts, completions):
            ids = encode_prompt_completion(self.tokenizer, prompt, completion).input_ids[:room]
            examples.append(self.wrap(Example(ids, [IGNORE] * len(ids))))
        return examples

    @torch.no_grad()
    def rewards_of(self, examples: Sequence[Example], *, normalised: bool = True) -> torch.Tensor:
        """Rewards [N] (CPU, fp32) of tokenised examples, `batch_size` per forward pass, packed (`packs()`) or
        batched by similar length to waste little on padding."""
        if not examples:
            return torch.zeros(0)
        device = self.head.weight.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None and self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
        result = torch.zeros(len(examples))
        starts = range(0, len(order), self.batch_size)
        packs = self.packs()
        if self.progress and len(order) > self.batch_size:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="scoring", unit="batch")
        with evaluating(self):
            for start in starts:
                chunk = order[start : start + self.batch_size]
                items = [examples[i] for i in chunk]
                batch = collate_packed(items, self.max_length, pad_id) if packs else collate([[e] for e in items], pad_id)
                batch = batch.to(device)
                result[chunk] = self(batch.input_ids, batch.attention_mask, batch.position_ids, batch.ends).cpu()
        return self.normalise(result) if normalised else result

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.normalisation.mean) / self.normalisation.std

    def raw_scores(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        """Rewards before normalisation [N]: the scale on which σ(r_a − r_b) is a preference probability."""
        return self.rewards_of(self.encode(prompts, completions), normalised=False)

    def score(
        self, prompts: Sequence[Prompt], completions: Sequence[str], references: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Normalised rewards [N] (mean 0, std 1 on the reference set chosen at training time), on the CPU.

        `references` is accepted for the common scorer interface and ignored: a reward model needs none.
        """
        return self.rewards_of(self.encode(prompts, completions))

    # --- saving -----------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": 1,
            "backbone": self.backbone,
            "pooling": self.pooling,
            "hidden_size": self.head.in_features,
            "max_length": self.max_length,
            "normalisation": asdict(self.normalisation),
        }

    def save(self, output: Path, tokenizer: PreTrainedTokenizerBase | None = None, **extra: Any) -> Path:
        """Write `output/model/` (and `output/adapter/` with LoRA); returns the model directory."""
        tokenizer = tokenizer or self.tokenizer
        save_model(self.model, tokenizer, Path(output))  # LoRA merged into a copy; the adapter saved too
        target = Path(output) / "model"
        head = {name: value.detach().float().cpu().contiguous() for name, value in self.head.state_dict().items()}
        save_file(head, str(target / HEAD_FILE))
        write_json(target / CONFIG_FILE, {**self.metadata(), **extra})  # last: its presence marks a complete save
        return target


def build_reward_model(
    name: str,
    *,
    backbone: Backbone = "causal",
    pooling: Pooling | None = None,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    lean: bool = True,
    trust_remote_code: bool = False,
    max_length: int = 512,
    batch_size: int = 16,
    packing: bool = True,
) -> RewardModel:
    """A fresh reward model (new head) on the backbone `name`: a causal LM, or an encoder with AutoModel;
    `lean` swaps in the activation-lean RMSNorm and SwiGLU (`alignkit.fused`) where the backbone has them."""
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    lora = lora or LoraSettings()
    causal = backbone == "causal"
    model = load_model(name, trust_remote_code=trust_remote_code) if causal else _load_encoder(name, trust_remote_code)
    if lean:
        lean_activations(model)
    model = apply_lora(model, lora, task_type="CAUSAL_LM" if causal else "FEATURE_EXTRACTION")
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    return RewardModel(
        model, tokenizer, backbone=backbone, pooling=pooling, max_length=max_length, batch_size=batch_size, packing=packing
    )


def _load_encoder(name: str, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModel

    source = resolve(name)
    try:
        return AutoModel.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise AlignkitError(
            f"cannot load '{name}' as an encoder: {exc}", fix="give a directory or hub id of a BERT-like model"
        ) from exc


def reward_model_dir(path: str | Path) -> Path | None:
    """The directory holding `reward_model.json`: `path` itself or its `model/` (an alignkit output directory)."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def load_reward_model(
    path: str | Path, *, device: str | torch.device | None = None, batch_size: int = 16, trust_remote_code: bool = False
) -> RewardModel:
    """Load a reward model saved by `alignkit rm` (its output directory or the `model/` inside), in eval mode."""
    directory = reward_model_dir(path)
    if directory is None:
        raise AlignkitError(
            f"'{path}' is not a reward model (no {CONFIG_FILE} in it or in its model/ folder)",
            fix="give the --output directory of `alignkit rm --action train` (or the model/ folder inside it)",
        )
    meta = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("backbone") not in ("causal", "encoder"):
        raise AlignkitError(f"{directory / CONFIG_FILE} is not an alignkit reward-model description", where=str(directory))
    tokenizer = load_tokenizer(str(directory), trust_remote_code=trust_remote_code)
    if meta["backbone"] == "causal":
        model = load_model(str(directory), trust_remote_code=trust_remote_code)
    else:
        model = _load_encoder(str(directory), trust_remote_code)
    rm = RewardModel(
        model,
        tokenizer,
        backbone=meta["backbone"],
        pooling=meta.get("pooling"),
        max_length=int(meta.get("max_length", 512)),
        batch_size=batch_size,
        normalisation=Normalisation(**meta.get("normalisation", {})),
    )
    head = load_file(str(directory / HEAD_FILE))
    if head["weight"].shape != rm.head.weight.shape:
        raise AlignkitError(
            f"the reward head has shape {tuple(head['weight'].shape)} but the backbone's hidden size is "
            f"{rm.head.in_features}",
            where=str(directory / HEAD_FILE),
        )
    rm.head.load_state_dict(head)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return rm.to(device).eval()


# --- several scorers as one -------------------------------------------------------------------------------

CombineKind = Literal["weighted_sum", "ensemble_mean", "ensemble_min", "llama2"]
COMBINE_KINDS: tuple[str, ...] = ("weighted_sum", "ensemble_mean", "ensemble_min", "llama2")


class CombinedReward:
    """Several scorers combined into one score [N].

    - `weighted_sum`: Σ_i w_i s_i (weights default to 1);
    - `ensemble_mean`: the mean of the members;
    - `ensemble_min`: the minimum: a completion scores high only if every member agrees, which makes
      exploiting one member's blind spot pay less (Coste et al. 2024, "Reward Model Ensembles Help Mitigate
      Overoptimization");
    - `llama2`: Touvron et al. 2023, §3.2.2: the safety score where the prompt is a safety prompt (a row's
      `unsafe: true`, or a prompt matching one of `unsafe_patterns`) or the safety score is below
      `safety_threshold` (0.15 in the paper, on the sigmoid of the score: `threshold_on: sigmoid`; with
      `threshold_on: score` the threshold applies to the score itself); the helpfulness score otherwise.

    Members should be on comparable scales: alignkit reward models are normalised to mean 0 / std 1.
    """

    def __init__(
        self,
        scorers: Mapping[str, Scorer],
        kind: CombineKind = "weighted_sum",
        *,
        weights: Mapping[str, float] | None = None,
        helpfulness: str = "helpfulness",
        safety: str = "safety",
        safety_threshold: float = 0.15,
        threshold_on: Literal["sigmoid", "score"] = "sigmoid",
        unsafe_patterns: Sequence[str] = (),
    ):
        if kind not in COMBINE_KINDS:
            raise AlignkitError(f"unknown combination kind {kind!r}", fix=f"use one of {', '.join(COMBINE_KINDS)}")
        if not scorers:
            raise AlignkitError("a combined reward needs at least one scorer")
        if threshold_on not in ("sigmoid", "score"):
            raise AlignkitError(f"threshold_on must be sigmoid or score, not {threshold_on!r}")
        self.scorers = dict(scorers)
        self.kind = kind
        self.name = kind
        self.weights = {name: 1.0 for name in self.scorers} | dict(weights or {})
        unknown = sorted(set(self.weights) - set(self.scorers))
        if unknown:
            raise AlignkitError(f"weights given for unknown scorers: {', '.join(unknown)}")
        self.helpfulness, self.safety = helpfulness, safety
        if kind == "llama2":
            missing = [n for n in (helpfulness, safety) if n not in self.scorers]
            if missing:
                raise AlignkitError(
                    f"the llama2 rule needs a helpfulness and a safety scorer; not found: {', '.join(missing)}",
                    fix=f"name them in models: (have {', '.join(self.scorers)}) or set helpfulness:/safety:",
                )
        self.safety_threshold, self.threshold_on = safety_threshold, threshold_on
        try:
            self.unsafe_patterns = [re.compile(p) for p in unsafe_patterns]
        except re.error as exc:
            raise AlignkitError(f"bad regular expression in unsafe_patterns: {exc}") from None
        self.last_used_safety: torch.Tensor | None = None
        """llama2 only: which completions of the last `score` call got the safety score [N] (for reports)"""

    def flag_unsafe(self, prompts: Sequence[Prompt], unsafe: Sequence[bool] | None = None) -> torch.Tensor:
        """[N] bool: prompts marked unsafe by the caller or matching an `unsafe_patterns` regex in a user turn."""
        flags = [bool(u) for u in unsafe] if unsafe is not None else [False] * len(prompts)
        if len(flags) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(flags)} unsafe flags")
        for i, prompt in enumerate(prompts):
            if not flags[i] and self.unsafe_patterns:
                text = "\n".join(m.content for m in prompt if m.role == "user")
                flags[i] = any(p.search(text) for p in self.unsafe_patterns)
        return torch.tensor(flags, dtype=torch.bool)

    def _member(
        self, name: str, prompts: Sequence[Prompt], completions: Sequence[str], references: Sequence[str] | None
    ) -> torch.Tensor:
        scorer = self.scorers[name]
        scores = scorer.score(prompts, completions) if references is None else scorer.score(prompts, completions, references)
        return torch.as_tensor(scores).float().cpu().reshape(-1)

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        references: Sequence[str] | None = None,
        *,
        unsafe: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """Combined scores [N]; `references` go to the members (verifiers use them, reward models ignore them);
        `unsafe` (llama2 only) marks safety prompts, e.g. from a row's `unsafe` field."""
        if self.kind == "llama2":
            helpful = self._member(self.helpfulness, prompts, completions, references)
            safe = self._member(self.safety, prompts, completions, references)
            gate = torch.sigmoid(safe) if self.threshold_on == "sigmoid" else safe
            use_safety = self.flag_unsafe(prompts, unsafe) | (gate < self.safety_threshold)
            self.last_used_safety = use_safety
            return torch.where(use_safety, safe, helpful)
        names = list(self.scorers)
        scores = torch.stack([self._member(n, prompts, completions, references) for n in names])  # [M, N]
        if self.kind == "weighted_sum":
            return (torch.tensor([self.weights[n] for n in names])[:, None] * scores).sum(0)
        if self.kind == "ensemble_mean":
            return scores.mean(0)
        return scores.min(0).values  # ensemble_min

    @classmethod
    def from_config(
        cls, spec: Mapping[str, Any], *, source: str = "config", load: Callable[[str], Scorer] | None = None
    ) -> "CombinedReward":
        """Build from a mapping like `examples/reward_combo.yaml`; `load` turns a model path into a scorer."""
        load = load or (lambda p: load_reward_model(p))
        allowed = {"kind", "models", "helpfulness", "safety", "safety_threshold", "threshold_on", "unsafe_patterns"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            fix = f"allowed: {', '.join(sorted(allowed))}"
            raise AlignkitError(f"unknown key(s) {', '.join(unknown)}", where=source, fix=fix)
        models = spec.get("models")
        if not isinstance(models, Mapping) or not models:
            raise AlignkitError("'models' must map names to reward-model paths (or {path, weight})", where=source)
        scorers, weights = {}, {}
        for name, entry in models.items():
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, Mapping) or "path" not in entry or set(entry) - {"path", "weight"}:
                raise AlignkitError(f"models.{name} must be a path or {{path: ..., weight: ...}}", where=source)
            scorers[str(name)] = load(str(entry["path"]))
            if "weight" in entry:
                if isinstance(entry["weight"], bool) or not isinstance(entry["weight"], (int, float)):
                    raise AlignkitError(f"models.{name}.weight must be a number", where=source)
                weights[str(name)] = float(entry["weight"])
        patterns = spec.get("unsafe_patterns") or []
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise AlignkitError("unsafe_patterns must be a list of regular expressions", where=source)
        try:
            threshold = float(spec.get("safety_threshold", 0.15))
        except (TypeError, ValueError):
            raise AlignkitError("safety_threshold must be a number", where=source) from None
        try:
            return cls(
                scorers,
                spec.get("kind", "weighted_sum"),
                weights=weights,
                helpfulness=str(spec.get("helpfulness", "helpfulness")),
                safety=str(spec.get("safety", "safety")),
                safety_threshold=threshold,
                threshold_on=spec.get("threshold_on", "sigmoid"),
                unsafe_patterns=patterns,
            )
        except AlignkitError as exc:
            raise AlignkitError(exc.what, where=source, fix=exc.fix) from None

    @classmethod
    def from_yaml(cls, path: str | Path, *, load: Callable[[str], Scorer] | None = None) -> "CombinedReward":
        return cls.from_config(read_yaml_config(path), source=str(path), load=load)


def load_scorer(name: str, *, device: str | torch.device | None = None, batch_size: int = 16) -> Scorer:
    """A reward model directory, or a `.yaml` file describing a `CombinedReward` of several."""
    if str(name).endswith((".yaml", ".yml")):
        return CombinedReward.from_yaml(name, load=lambda p: load_reward_model(p, device=device, batch_size=batch_size))
    return load_reward_model(name, device=device, batch_size=batch_size)
