"""Sampling K completions per prompt: the rollout engine of best-of-N, GRPO, PPO and evaluation.

`Generator` is the interface; `TransformersGenerator` implements it with a `transformers` causal LM, its KV
cache and a small decoding loop of our own. The prompt is encoded once and its cache copied K times (prefix
sharing), a row that has finished leaves the batch, and waiting prompts take the freed rows (continuous
batching). A vLLM backend can implement the same interface.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch
import transformers
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from alignkit.config import SEEDS, at_least, within
from alignkit.data.loading import load_records
from alignkit.data.records import Prompt, PromptWithAnswer
from alignkit.data.tokenize import IGNORE, Example, left_padded, prompt_ids
from alignkit.errors import AlignkitError
from alignkit.io import write_jsonl
from alignkit.losses.policy import penalise_cut
from alignkit.models import evaluating, load_model, load_tokenizer, with_cache
from alignkit.options import ScorerOptions, require_sampling
from alignkit.rewards.scorer import check_references
from alignkit.rewards.verifiers import REWARD_TIMEOUT, build_scorer


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
    fraction of the machine's peak and the blocked layout does markedly better (bench/README.md). The copies
    cost one pass over the weights per call and as much memory as the weights while it lasts; a module that
    already has its own forward (an accelerate hook) keeps it.
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
    """Batched sampling with a `transformers` causal LM and its KV cache.

    With `refill` (continuous batching), waiting prompts join the running batch as its rows finish, so the batch
    stays full until the prompts run out; without it, prompts go in fixed batches of `batch_size`, each decoded
    until its longest answer ends. Both give each row the logits it would have alone (see `_Rows`), so greedy
    answers do not depend on either choice, and sampled ones depend only on the seed (see `_sample_all`).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 8,
                 refill: bool | None = None):  # fmt: skip
        # By default continuous batching where the model's cache can be merged, fixed batches elsewhere
        # (sliding-window and other non-full-attention caches): the answers are the same either way.
        if refill is None:
            refill = _mergeable(DynamicCache(config=model.config))
        self.model, self.tokenizer, self.batch_size, self.refill = model, tokenizer, batch_size, refill
        self.stop_ids = sorted({tokenizer.eos_token_id, *(_as_list(model.generation_config.eos_token_id))} - {None})

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Sample]:
        encoded = [prompt_ids(self.tokenizer, p) for p in prompts]
        if self.refill:
            _kv_layers(DynamicCache(config=self.model.config))  # a cache layout joins cannot merge fails here, early
        # Longest first: a fixed batch then holds prompts of similar length and little padding, and a prompt that
        # joins a running batch is no longer than the rows there, so it only ever pads itself.
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        with evaluating(self.model), packed_linears(self.model, min(len(prompts), self.batch_size) * params.n):
            answers = self._sample_all(encoded, order, params)
        return [
            Sample(prompt, ids, [
                Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), tokens, stop is not None, stop)
                for tokens, stop in (answers[i, k] for k in range(params.n))
            ])
            for i, (prompt, ids) in enumerate(zip(prompts, encoded))
        ]  # fmt: skip

    def _sample_all(self, encoded: list[list[int]], order: Sequence[int],
                    params: SamplingParams) -> dict[tuple[int, int], tuple[list[int], int | None]]:  # fmt: skip
        """Each (prompt, sample)'s tokens and stop token, admitting the prompts in `order` as `_admissions` allows.

        A row that stops, or reaches `max_new_tokens`, leaves the batch and the cache at once: `model.generate`
        would keep it in every forward pass until the longest row ends.

        Seeding: `params.seed` draws one seed per prompt, by its index in `encoded`; a prompt's seed draws the
        uniforms of its K completions, one per token (`next_tokens` samples by inverse CDF). A completion thus
        uses the same draws whatever the batch size, `refill`, the order of admission or the rows that finish
        around it; only rounding in logits computed in a differently shaped batch could move a draw across a
        token's boundary.
        """
        device = next(self.model.parameters()).device
        seeds = torch.randint(2**62, (len(encoded),), generator=torch.Generator().manual_seed(params.seed)).tolist()
        stop_ids = torch.tensor(self.stop_ids, device=device)
        waiting = deque(order)
        generated: dict[tuple[int, int], list[int]] = {}
        stops: dict[tuple[int, int], int | None] = {}
        rows: _Rows | None = None
        cache = DynamicCache(config=self.model.config)
        while waiting or rows:
            joining = [waiting.popleft() for _ in range(self._admissions(len(waiting), len(rows or ()), params.n))]
            if joining:
                draws = torch.cat([
                    torch.rand(params.n, params.max_new_tokens, generator=torch.Generator().manual_seed(seeds[i]))
                    for i in joining
                ]).to(device)  # fmt: skip
                slots = [(i, k) for i in joining for k in range(params.n)]
                new_rows, new_cache = self._prefill([encoded[i] for i in joining], params.n, slots, draws)
                if rows:
                    _join_caches(cache, new_cache, len(slots))
                    rows = rows.join(new_rows)
                else:
                    rows, cache = new_rows, new_cache
                generated |= {slot: [] for slot in slots}
            assert rows is not None  # the loop runs while rows decode or prompts wait, and a waiting prompt joins
            logits = self.model(input_ids=rows.tokens[:, None], attention_mask=rows.attention,
                                position_ids=rows.positions[:, None], **with_cache(self.model, cache), use_cache=True,
                                logits_to_keep=1).logits[:, -1]  # fmt: skip
            chosen = next_tokens(logits, params.temperature, params.top_p, rows.draws.gather(1, rows.steps[:, None])[:, 0])
            ended = torch.isin(chosen, stop_ids)
            for slot, token, stopped in zip(rows.slots, chosen.tolist(), ended.tolist()):
                if stopped:
                    stops[slot] = token
                else:
                    generated[slot].append(token)
            rows = rows.advanced(chosen)
            done = ended | (rows.steps >= params.max_new_tokens)
            if done.any():
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows = rows.select(keep)
                # Fixed batches stay as they were, for any cache layout: trimming rewrites the cache's tensors.
                if self.refill:
                    rows = _trim(rows, cache)
        return {slot: (tokens, stops.get(slot)) for slot, tokens in generated.items()}

    def _admissions(self, waiting: int, live_rows: int, n: int) -> int:
        """How many of the `waiting` prompts join before the next decoding step: with `refill`, every one whose K
        rows fit beside the live rows (those that fit at the same time share one prefill pass); without, a whole
        batch once the last has ended."""
        if not self.refill:
            return 0 if live_rows else min(waiting, self.batch_size)
        # Waiting for more free rows to share a prefill would not pay: a prefill's cost is mostly per token, so
        # fewer, larger passes save little, while a free row idles through every step it waits.
        return min(waiting, (self.batch_size * n - live_rows) // n)

    def _prefill(self, batch: list[list[int]], n: int, slots: list[tuple[int, int]],
                 draws: torch.Tensor) -> tuple[_Rows, DynamicCache]:  # fmt: skip
        """Rows for the `n` completions of each prompt of `batch`, ready to feed its last token, and their cache."""
        device = draws.device
        input_ids, attention, positions = left_padded(batch, self.tokenizer.pad_token_id, device)
        cache = DynamicCache(config=self.model.config)
        if input_ids.shape[1] > 1:
            # Prefix sharing: the prompt (all but its last token) runs once, then its cache is copied K times.
            self.model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1],
                       **with_cache(self.model, cache), use_cache=True, logits_to_keep=1)  # fmt: skip
            cache.batch_repeat_interleave(n)
        rows = _Rows(
            slots, input_ids[:, -1].repeat_interleave(n), attention.repeat_interleave(n, dim=0),
            positions[:, -1].repeat_interleave(n), torch.zeros(len(slots), dtype=torch.long, device=device), draws,
        )  # fmt: skip
        return rows, cache


@dataclass(frozen=True)
class _Rows:
    """The rows being decoded, one per (prompt, sample), in the order of the KV cache's rows.

    Row r's cache holds its real tokens in its last columns, after left padding: `attention[r]` is zeros then
    ones, its last column standing for `tokens[r]`, fed next at position `positions[r]` (real tokens before it).
    Masked columns get no attention weight at all, so a row's logits are those of its unpadded sequence.
    """

    slots: list[tuple[int, int]]
    """(prompt index, sample index) of each row"""
    tokens: torch.Tensor
    """[R] the token each row feeds next"""
    attention: torch.Tensor
    """[R, C + 1] for C cached columns: 1 on a row's real tokens, 0 on its left padding"""
    positions: torch.Tensor
    """[R] the position of `tokens`"""
    steps: torch.Tensor
    """[R] tokens the row has sampled so far"""
    draws: torch.Tensor
    """[R, max_new_tokens] the uniform draw that samples each of the row's tokens"""

    def __len__(self) -> int:
        return len(self.slots)

    def advanced(self, chosen: torch.Tensor) -> _Rows:
        """The rows after feeding `tokens`, with `chosen` to feed next."""
        attention = torch.cat([self.attention, self.attention.new_ones(len(self), 1)], dim=-1)
        return _Rows(self.slots, chosen, attention, self.positions + 1, self.steps + 1, self.draws)

    def select(self, keep: torch.Tensor) -> _Rows:
        """Only the rows at indices `keep`."""
        return _Rows([self.slots[i] for i in keep.tolist()], self.tokens[keep], self.attention[keep],
                     self.positions[keep], self.steps[keep], self.draws[keep])  # fmt: skip

    def join(self, other: _Rows) -> _Rows:
        """These rows then `other`'s, the narrower attention left-padded to the wider (as `_join_caches` does)."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        return _Rows(
            self.slots + other.slots, torch.cat([self.tokens, other.tokens]),
            torch.cat([_left_pad(self.attention, width, 1), _left_pad(other.attention, width, 1)]),
            torch.cat([self.positions, other.positions]), torch.cat([self.steps, other.steps]),
            torch.cat([self.draws, other.draws]),
        )  # fmt: skip


def _kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The per-layer stores of `cache`, each holding keys and values of shape [rows, heads, columns, head dim].

    transformers' caches select and repeat rows (`batch_select_indices`, `batch_repeat_interleave`) but neither
    concatenate two caches nor drop leading columns, which continuous batching does to the tensors themselves.
    That is only right for full-attention `DynamicLayer`s; any other layout (sliding-window, quantized, linear
    attention, or a transformers that stores layers elsewhere) is refused rather than silently misaligned.
    """
    layers = getattr(cache, "layers", None)
    if not _mergeable(cache):
        found = sorted({type(layer).__name__ for layer in layers}) if layers is not None else type(cache).__name__
        raise AlignkitError(
            f"continuous batching merges only full-attention DynamicLayer caches; this model's cache has {found} "
            f"(transformers {transformers.__version__})",
            fix="decode fixed batches: TransformersGenerator(..., refill=False)",
        )
    return layers


def _mergeable(cache: DynamicCache) -> bool:
    """Whether `_kv_layers` can merge and trim `cache`: every layer a full-attention `DynamicLayer`."""
    layers = getattr(cache, "layers", None)
    return layers is not None and all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` up to `width` entries."""
    shape = list(tensor.shape)
    shape[dim] = width - tensor.shape[dim]
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _join_caches(cache: DynamicCache, joining: DynamicCache, joining_rows: int) -> None:
    """Append the `joining_rows` rows of `joining` to `cache`, the narrower side left-padded with zeros to the
    wider: the columns a row masks out, whatever they hold, get no attention weight."""
    for layer, new in zip(_kv_layers(cache), _kv_layers(joining), strict=True):
        width = max(layer.get_seq_length(), new.get_seq_length())
        for name in ("keys", "values"):
            old = getattr(layer, name)
            # Prompts of a single token leave nothing to cache: their rows start with no columns.
            added = getattr(new, name) if new.get_seq_length() else old.new_zeros(joining_rows, old.shape[1], 0, old.shape[3])
            setattr(layer, name, torch.cat([_left_pad(old, width, 2), _left_pad(added, width, 2)]))


def _trim(rows: _Rows, cache: DynamicCache) -> _Rows:
    """`rows` and `cache` without the leading columns that every row masks out (once the row that needed them
    has left), so the cache is as wide as the longest live row and attention costs no more."""
    unused = int(rows.attention.any(0).int().argmax()) if len(rows) else 0
    if unused == 0:
        return rows
    for layer in _kv_layers(cache):
        layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
    return replace(rows, attention=rows.attention[:, unused:])


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, draws: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` [R, V]: the argmax at temperature 0, else a sample of the tempered,
    nucleus-truncated distribution (the smallest set of top tokens whose probability reaches `top_p`) by the
    row's uniform draw in `draws` [R]."""
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
    draw = draws[:, None].to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class GenerateConfig(ScorerOptions):
    """Options of `alignkit generate`."""

    model: str = "smollm2-135m-instruct"
    """model to sample from: a directory, a hub id, an alignkit output directory, or a built-in alias"""
    prompts: str = ""
    """prompts: JSONL/JSON/Parquet with a 'prompt', 'instruction', 'question' or 'messages' field"""
    output: str = ""
    """where to write the samples as JSONL (prompt, completions, token counts); '-' for standard output"""
    num_samples: int = at_least(1, 1)
    """completions per prompt (K)"""
    temperature: float = at_least(0, 0.7)
    """sampling temperature; 0 for greedy decoding"""
    top_p: float = within("(0, 1]", 1.0)
    """nucleus sampling: keep the smallest set of tokens whose probability reaches this"""
    max_new_tokens: int = at_least(1, 256)
    """longest completion in tokens"""
    batch_size: int = at_least(1, 8)
    """prompts per generation batch"""
    limit: int = at_least(0, 0)
    """use only the first N prompts (0: all)"""
    best_of: int = at_least(0, 0)
    """best-of-N: sample N completions, score them with --scorer, and keep the best one per prompt"""
    scorer: str = ""
    """scorer for --best-of: gsm8k, exact, format, python:module:function, rm:PATH, or a weighted sum"""
    cut_penalty: float = at_least(0, 0.0)
    """best-of-N: subtracted from the score of an answer cut at --max-new-tokens before the best is picked (GRPO's
    --cut-penalty); e.g. 1 for a 0-1 scorer: an unfinished answer is picked only when every answer is unfinished"""
    seed: int = within(SEEDS, 0)
    """sampling seed"""
    trust_remote_code: bool = False
    """run code shipped with a hub model (off unless you trust it)"""

    def validate(self) -> None:
        if not self.prompts:
            raise AlignkitError("no prompts given", fix="pass --prompts FILE")
        if not self.output:
            raise AlignkitError("no output file given", fix="pass --output FILE.jsonl (or - for standard output)")
        if self.best_of and (self.best_of < 2 or not self.scorer):
            raise AlignkitError("--best-of N needs N ≥ 2 and a --scorer", fix="e.g. --best-of 8 --scorer rm:outputs/rm")
        require_sampling(self.best_of or self.num_samples, self.temperature, "--best-of" if self.best_of else "--num-samples")


def sample_to_json(sample: Sample) -> dict:
    prompt = sample.prompt
    return {
        "prompt": prompt[-1].content if len(prompt) == 1 else [asdict(m) for m in prompt],
        "completions": [c.text for c in sample.completions],
        "prompt_tokens": len(sample.prompt_token_ids),
        "completion_tokens": [len(c.token_ids) for c in sample.completions],
        "finished": [c.finished for c in sample.completions],
    }


def best_of_n(samples: list[Sample], scores: torch.Tensor, cut_penalty: float = 0.0) -> list[dict]:
    """Rows of best-of-N: the highest-scoring completion of each prompt, with every score kept; a completion cut
    at the length cap has `cut_penalty` taken off first (a verifier scores a cut answer as it stands, so an
    answer that loops to the cap after meeting its constraints would otherwise be picked, imitated by RSFT and
    preferred by on-policy DPO)."""
    n = len(samples[0].completions)
    finished = torch.tensor([c.finished for s in samples for c in s.completions])
    scores = penalise_cut(torch.as_tensor(scores, dtype=torch.float32), finished, cut_penalty)
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
    scorer = build_scorer(config.scorer, timeout=config.reward_timeout) if config.best_of else None
    check_references(scorer, prompts)  # before loading the model and sampling, which take the time
    tokenizer = load_tokenizer(name, trust_remote_code=config.trust_remote_code)
    model = load_model(name, trust_remote_code=config.trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda")
    generator = TransformersGenerator(model, tokenizer, batch_size=config.batch_size)
    n = config.best_of or config.num_samples
    samples = generator.generate([r.prompt for r in prompts], SamplingParams(n, config.temperature, config.top_p, config.max_new_tokens, config.seed))
    if scorer is None:
        return [sample_to_json(s) for s in samples]
    flat_prompts = [r.prompt for r in prompts for _ in range(n)]
    completions = [c.text for s in samples for c in s.completions]
    references = [r.answer for r in prompts for _ in range(n)]
    return best_of_n(samples, scorer.score(flat_prompts, completions, references), config.cut_penalty)


def sample_best_of(model: str, prompts: str, *, n: int, scorer: str, temperature: float, max_new_tokens: int,
                   seed: int, limit: int = 0, trust_remote_code: bool = False, reward_timeout: float = REWARD_TIMEOUT,
                   cut_penalty: float = 0.0) -> list[dict]:  # fmt: skip
    """Best-of-`n` rows, every completion and score kept, of `model` on the first `limit` prompts of `prompts`
    (all with 0): the sampling stage of rejection-sampling fine-tuning and of on-policy DPO."""
    records, _ = load_records(prompts, "prompt", limit=limit or None)
    sampling = GenerateConfig(model=model, prompts=prompts, best_of=n, scorer=scorer, temperature=temperature,
                              max_new_tokens=max_new_tokens, seed=seed, trust_remote_code=trust_remote_code,
                              reward_timeout=reward_timeout, cut_penalty=cut_penalty)  # fmt: skip
    return sample_prompts(sampling, records)  # type: ignore[arg-type]


def run_generate(config: GenerateConfig) -> list[dict]:
    records, _ = load_records(config.prompts, "prompt", limit=config.limit or None)
    rows = sample_prompts(config, records)  # type: ignore[arg-type]
    write_jsonl(rows, config.output)
    if config.output != "-":
        n_tokens = sum(sum(r["completion_tokens"]) for r in rows)
        what = f"best of {config.best_of} by {config.scorer}" if config.best_of else f"{config.num_samples} completions"
        print(f"wrote {len(rows)} prompts × {what} ({n_tokens} tokens generated) to {config.output}", file=sys.stderr)
    return rows
