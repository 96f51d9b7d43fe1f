"""Sampling K completions per prompt: the rollout engine of best-of-N, GRPO, PPO and evaluation.

`Generator` is the interface; `TransformersGenerator` implements it with a `transformers` causal LM, its KV
cache and a small decoding loop of our own. The prompt is encoded once and its cache copied K times (prefix
sharing), and a row that has finished leaves the batch. A vLLM backend can implement the same interface.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from alignkit.data.loading import load_records
from alignkit.data.records import Prompt, PromptWithAnswer
from alignkit.data.tokenize import IGNORE, Example, prompt_ids
from alignkit.errors import AlignkitError
from alignkit.io import write_jsonl
from alignkit.models import load_model, load_tokenizer, with_cache


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """completions per prompt"""
    temperature: float = 1.0
    """0 means greedy decoding"""
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finished: bool
    """True when the model ended the answer itself (end-of-turn token), False when cut by max_new_tokens"""
    stop_id: int | None = None
    """the end-of-turn token that ended it (not in `token_ids`); training on rollouts appends it"""

    @property
    def trained_ids(self) -> list[int]:
        """The tokens a policy update scores: the completion and, when it ended itself, its stop token."""
        return self.token_ids + ([self.stop_id] if self.stop_id is not None else [])


@dataclass
class Sample:
    prompt: Prompt
    prompt_token_ids: list[int]
    completions: list[Completion]


def rollout_rows(samples: list[Sample]) -> list[list[Example]]:
    """Each completion as a row: prompt then completion tokens, trained on the completion (and its stop token)."""
    rows = []
    for sample in samples:
        for completion in sample.completions:
            ids = sample.prompt_token_ids + completion.trained_ids
            labels = [IGNORE] * (len(sample.prompt_token_ids) - 1) + completion.trained_ids + [IGNORE]
            rows.append([Example(ids, labels)])
    return rows


class Generator(Protocol):
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Sample]: ...


def _packed_linear(x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """Inside it, each fp32 `nn.Linear` of a CPU model multiplies by a copy of its weight in oneDNN's blocked
    layout, made for `rows` input rows (as torch.compile's freezing does on a CPU).

    A decoding step multiplies a few rows by every weight matrix, where the plain fp32 matmul reaches a
    fraction of the machine's peak: on the 2-core AVX2 CPU the output head of the built-in model took 26 ms
    instead of 60 for 8 rows, an MLP projection 0.9 ms instead of 1.7. The copies cost one pass over the
    weights per call and as much memory as the weights while it lasts; a module that already has its own
    forward (an accelerate hook) keeps it.
    """
    linears = [
        m for m in model.modules()
        if type(m) is torch.nn.Linear and "forward" not in vars(m)
        and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]  # fmt: skip
    # Under CPU autocast a linear computes in bf16, which the packed fp32 weight would silently bypass.
    if (
        not linears or torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.is_available()
        or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    ):  # fmt: skip
        yield
        return
    for m in linears:
        packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
        m.forward = functools.partial(_packed_linear, weight=packed, bias=None if m.bias is None else m.bias.detach())
    try:
        yield
    finally:
        for m in linears:
            del m.forward


class TransformersGenerator:
    """Batched sampling with a `transformers` causal LM and its KV cache."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = sorted({tokenizer.eos_token_id, *(_as_list(model.generation_config.eos_token_id))} - {None})

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Sample]:
        encoded = [prompt_ids(self.tokenizer, p) for p in prompts]
        # Longest first, so each batch holds prompts of similar length and little padding.
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        results: list[Sample | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        with packed_linears(self.model, min(len(prompts), self.batch_size) * params.n):
            for batch_index, start in enumerate(range(0, len(order), self.batch_size)):
                chunk = order[start : start + self.batch_size]
                torch.manual_seed(params.seed + batch_index)
                outputs = self._generate_batch([encoded[i] for i in chunk], params)
                for i, completions in zip(chunk, outputs):
                    results[i] = Sample(prompts[i], encoded[i], completions)
        self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        device = next(self.model.parameters()).device
        width = max(map(len, batch))
        pad = self.tokenizer.pad_token_id
        # Left padding keeps every prompt's last token in the last column, where sampling continues.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        # Positions count real tokens only, as in training, where rows are right-padded from position 0.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        if width > 1:
            # Prefix sharing: the prompt (all but its last token) runs once, then its cache is copied K times.
            self.model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1],
                       **with_cache(self.model, cache), use_cache=True, logits_to_keep=1)  # fmt: skip
            cache.batch_repeat_interleave(params.n)
        rows = self._decode(
            input_ids[:, -1].repeat_interleave(params.n), attention.repeat_interleave(params.n, dim=0),
            positions[:, -1].repeat_interleave(params.n), cache, params,
        )  # fmt: skip
        completions = [
            Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, stop is not None, stop) for ids, stop in rows
        ]
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(batch))]

    def _decode(self, last: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                params: SamplingParams) -> list[tuple[list[int], int | None]]:  # fmt: skip
        """Sample after each row's `last` prompt token; a row that stops leaves the batch and the cache.

        `model.generate` would keep finished rows in every forward pass until the longest one ends; here the
        batch shrinks as answers end, which pays most where lengths vary (K samples of one prompt).
        """
        tokens, rows = last, torch.arange(last.shape[0])
        generated: list[list[int]] = [[] for _ in range(last.shape[0])]
        stops: list[int | None] = [None] * last.shape[0]
        stop_ids = torch.tensor(self.stop_ids, device=last.device)
        for _ in range(params.max_new_tokens):
            logits = self.model(input_ids=tokens[:, None], attention_mask=attention, position_ids=positions[:, None],
                                **with_cache(self.model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]  # fmt: skip
            chosen = next_tokens(logits, params.temperature, params.top_p)
            ended = torch.isin(chosen, stop_ids)
            for row, token, stopped in zip(rows.tolist(), chosen.tolist(), ended.tolist()):
                if stopped:
                    stops[row] = token
                else:
                    generated[row].append(token)
            if ended.any():
                keep = (~ended).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                rows, chosen, attention, positions = rows[keep.cpu()], chosen[keep], attention[keep], positions[keep]
            tokens = chosen
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=-1)
            positions = positions + 1
        return list(zip(generated, stops))


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of `logits` [R, V]: the argmax at temperature 0, else a sample of the tempered,
    nucleus-truncated distribution (the smallest set of top tokens whose probability reaches `top_p`)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        ranked, order = probs.sort(dim=-1, descending=True)
        # A token is dropped when the tokens ranked above it already reach top_p; the first always stays.
        ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, ranked)
    # Inverse-CDF sampling: one uniform draw per row. torch.multinomial draws one exponential per vocabulary
    # entry, a tenth of a decoding step's time at this model size. `right=True` never lands on a zero.
    cdf = probs.cumsum(-1)
    draw = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class GenerateConfig:
    """Options of `alignkit generate`."""

    model: str = "smollm2-135m-instruct"
    """model to sample from: a directory, a hub id, an alignkit output directory, or a built-in alias"""
    prompts: str = ""
    """prompts: JSONL/JSON/Parquet with a 'prompt', 'instruction', 'question' or 'messages' field"""
    output: str = ""
    """where to write the samples as JSONL (prompt, completions, token counts); '-' for standard output"""
    num_samples: int = 1
    """completions per prompt (K)"""
    temperature: float = 0.7
    """sampling temperature; 0 for greedy decoding"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens whose probability reaches this"""
    max_new_tokens: int = 256
    """longest completion in tokens"""
    batch_size: int = 8
    """prompts per generation batch"""
    limit: int = 0
    """use only the first N prompts (0: all)"""
    best_of: int = 0
    """best-of-N: sample N completions, score them with --scorer, and keep the best one per prompt"""
    scorer: str = ""
    """scorer for --best-of: gsm8k, exact, format, python:module:function, rm:PATH, or a weighted sum"""
    seed: int = 0
    """sampling seed"""
    trust_remote_code: bool = False
    """run code shipped with a hub model (off unless you trust it)"""

    def validate(self) -> None:
        if not self.prompts:
            raise AlignkitError("no prompts given", fix="pass --prompts FILE")
        if not self.output:
            raise AlignkitError("no output file given", fix="pass --output FILE.jsonl (or - for standard output)")
        if self.num_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise AlignkitError("--num-samples, --max-new-tokens and --batch-size must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise AlignkitError("--temperature must be ≥ 0 and --top-p in (0, 1]")
        if self.best_of and (self.best_of < 2 or not self.scorer):
            raise AlignkitError("--best-of N needs N ≥ 2 and a --scorer", fix="e.g. --best-of 8 --scorer rm:outputs/rm")


def sample_to_json(sample: Sample) -> dict:
    prompt = sample.prompt
    return {
        "prompt": prompt[-1].content if len(prompt) == 1 else [asdict(m) for m in prompt],
        "completions": [c.text for c in sample.completions],
        "prompt_tokens": len(sample.prompt_token_ids),
        "completion_tokens": [len(c.token_ids) for c in sample.completions],
        "finished": [c.finished for c in sample.completions],
    }


def best_of_n(samples: list[Sample], scores: torch.Tensor) -> list[dict]:
    """Rows of best-of-N: the highest-scoring completion of each prompt, with every score kept."""
    n = len(samples[0].completions)
    by_prompt = scores.view(len(samples), n)
    rows = []
    for sample, row_scores in zip(samples, by_prompt):
        best = int(row_scores.argmax())
        rows.append({
            **sample_to_json(sample),
            "best": sample.completions[best].text,
            "best_score": float(row_scores[best]),
            "scores": [float(x) for x in row_scores],
        })  # fmt: skip
    return rows


def sample_prompts(config: GenerateConfig, prompts: list[PromptWithAnswer], model_name: str | None = None) -> list[dict]:
    """Sample (and with --best-of, score and pick) completions for prompt records; JSON rows out."""
    name = model_name or config.model
    tokenizer = load_tokenizer(name, trust_remote_code=config.trust_remote_code)
    model = load_model(name, trust_remote_code=config.trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda")
    generator = TransformersGenerator(model, tokenizer, batch_size=config.batch_size)
    n = config.best_of or config.num_samples
    samples = generator.generate([r.prompt for r in prompts], SamplingParams(n, config.temperature, config.top_p, config.max_new_tokens, config.seed))
    if not config.best_of:
        return [sample_to_json(s) for s in samples]
    from alignkit.rewards.verifiers import build_scorer

    scorer = build_scorer(config.scorer)
    flat_prompts = [r.prompt for r in prompts for _ in range(n)]
    completions = [c.text for s in samples for c in s.completions]
    references = [r.answer for r in prompts for _ in range(n)]
    return best_of_n(samples, scorer.score(flat_prompts, completions, references))


def run_generate(config: GenerateConfig) -> list[dict]:
    records, _ = load_records(config.prompts, "prompt", limit=config.limit or None)
    rows = sample_prompts(config, records)  # type: ignore[arg-type]
    write_jsonl(rows, config.output)
    if config.output != "-":
        n_tokens = sum(sum(r["completion_tokens"]) for r in rows)
        what = f"best of {config.best_of} by {config.scorer}" if config.best_of else f"{config.num_samples} completions"
        print(f"wrote {len(rows)} prompts × {what} ({n_tokens} tokens generated) to {config.output}", file=sys.stderr)
    return rows
