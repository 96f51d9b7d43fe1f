"""Reward modelling (`alignkit rm`), step 2 of InstructGPT: learn a scalar r(x, y) from ranked answers.

Loss (Ouyang et al. 2022, eq. 1, with Llama 2's margin, Touvron et al. 2023, eq. 2): a prompt x with K
answers ranked best first gives C(K, 2) pairs (y_w, y_l), all trained on in the same batch:

    loss(x) = −1/C(K,2) · Σ_(y_w, y_l) log σ(r(x, y_w) − r(x, y_l) − m(x))

Each answer goes through the model once however many pairs it is in, and averaging over a prompt's pairs
makes each prompt count once, whatever its K: InstructGPT found that treating the C(K, 2) pairs as
separate examples overfits, since each answer then gets K − 1 gradient updates per epoch. The engine's
unit is the prompt: a micro-batch returns the sum over its prompts and the engine divides by the number of
prompts in the whole optimiser step. A pair is a ranking with K = 2.

After training, the rewards are normalised (mean 0, std 1) on a reference set of responses, the held-out
set if there is one, else the training set, so that PPO starts from rewards of a known scale
(InstructGPT normalises so that reference demonstrations score 0 on average; we use the held-out
responses, which need no extra sampling).

The answers of a micro-batch are packed into rows of at most --max-length tokens, with position ids
restarting at 0 for each answer and the reward read at each answer's last token, so no padding is computed
(`--no-packing`: one right-padded row per answer; both give the same rewards to float rounding). The
answers of a comparison share one copy of its prompt in the row (`--share-prompts`, the default), under a
mask that lets each answer see the prompt and itself only.

`--action eval` reports accuracy, mean margin and expected calibration error on held-out comparisons;
`--action score` adds a reward to every row of a JSONL file (including `alignkit generate` output).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from alignkit.config import at_least
from alignkit.data.comparisons import Comparison, ComparisonBatch, collate_comparisons, encode_comparisons
from alignkit.data.loading import InvalidRecord, load_records, parse_prompt, read_rows
from alignkit.data.records import PreferencePair, Prompt, Ranking
from alignkit.data.tokenize import TruncationReport
from alignkit.engine import EngineConfig, Shuffled, make_accelerator, train
from alignkit.errors import AlignkitError, DataError
from alignkit.evaluation.metrics import expected_calibration_error
from alignkit.io import locks_output
from alignkit.losses.preference import bradley_terry_loss
from alignkit.models import describe
from alignkit.options import DataOptions, ModelOptions
from alignkit.rewards.reward_model import CombinedReward, Normalisation, RewardModel, build_reward_model, load_scorer
from alignkit.rewards.scorer import Scorer


@dataclass
class RMConfig(EngineConfig, DataOptions, ModelOptions):
    """Options of `alignkit rm`: train a reward model, evaluate one, or score completions with one."""

    action: Literal["train", "eval", "score"] = "train"
    """train: fit a reward model on the comparisons in --data; eval: accuracy and calibration of --model on the comparisons in --data; score: add a reward to every row of --data"""
    backbone: Literal["causal", "encoder"] = "causal"
    """causal: head on the last token of a causal LM (InstructGPT, Llama 2); encoder: a BERT-like model (AutoModel)"""
    pooling: Literal["auto", "last", "cls", "mean"] = "auto"
    """the hidden state the head reads: auto is the last token for causal, [CLS] for encoder"""
    use_margins: bool = True
    """subtract a pair's 'margin' field inside the loss (Llama 2); pairs without one get margin 0"""
    norm_samples: int = at_least(0, 512)
    """responses (held-out set, else training set) on which rewards are normalised to mean 0, std 1; 0 turns it off"""
    eval_batch_size: int = at_least(1, 16)
    """responses per forward pass when evaluating, normalising and scoring"""
    lr: float = 1e-5
    """peak learning rate of AdamW (InstructGPT used 9e-6; Llama 2 1e-5 below 70B)"""
    max_length: int = at_least(0, 0)
    """longest sequence in tokens, longer ones cut from the right; 0: 512 to train, and for eval/score the length the reward model was trained with"""
    packing: bool = True
    """pack a micro-batch's answers into rows of at most --max-length tokens without padding (causal backbones, when the attention keeps packed answers apart; else padded rows)"""
    share_prompts: bool = True
    """with --packing, put a comparison's prompt in a row once for all its answers, each answer seeing only the prompt and itself (sdpa or eager attention): the same rewards, the prompt's work done once"""

    def length(self) -> int:
        return self.max_length or 512

    def validate(self) -> None:
        if self.action == "train":
            self.require_data()
            if not self.output:
                raise AlignkitError("no output directory given", fix="pass --output DIR")
            if self.length() < 8:
                raise AlignkitError("--max-length is too small for a prompt and an answer")
            return
        if not self.data:
            what = "comparisons to evaluate on" if self.action == "eval" else "rows to score"
            raise AlignkitError(f"no {what} given", fix="pass --data FILE.jsonl")
        if self.action == "score" and not self.output:
            raise AlignkitError("no output file given", fix="pass --output FILE.jsonl (or - for standard output)")


# --- the loss ---------------------------------------------------------------------------------------------


def comparison_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    n_comparisons: int,
    margins: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed per-prompt Bradley-Terry loss of G comparisons, and metric sums over the G comparisons.

    rewards [R]: one per response row; better / worse / group [P]: the rows of each ordered pair and the
    comparison it belongs to (`ComparisonBatch.pair_indices()`); margins [G] or None.

    Returns Σ_g (1/P_g) Σ_{pairs of g} −log σ(r_b − r_w − m_g), P_g = C(K_g, 2), so dividing by G gives the
    mean loss per prompt. Metric sums (divide by G for means): accuracy (fraction of a prompt's pairs with
    r_b > r_w), margin (mean r_b − r_w), reward_mean (mean reward of a prompt's answers), reward_std (the
    std of all rewards in the batch, times G).
    """
    pairs_per = torch.bincount(group, minlength=n_comparisons).to(rewards.dtype)  # C(K_g, 2) for each g
    weight = 1.0 / pairs_per[group]  # a prompt counts once, whatever its number of pairs
    margin = None if margins is None else margins.to(rewards)[group]
    losses = bradley_terry_loss(rewards[better], rewards[worse], margin)
    loss_sum = (weight * losses).sum()

    r = rewards.detach()
    diff = r[better] - r[worse]
    row_group = torch.empty(r.shape[0], dtype=torch.long, device=r.device)
    row_group[better], row_group[worse] = group, group
    answers = torch.bincount(row_group, minlength=n_comparisons).to(r.dtype)
    per_prompt_mean = torch.zeros(n_comparisons, dtype=r.dtype, device=r.device).index_add_(0, row_group, r) / answers
    metrics = {
        "accuracy": (weight * (diff > 0).to(r.dtype)).sum(),
        "margin": (weight * diff).sum(),
        "reward_mean": per_prompt_mean.sum(),
        "reward_std": r.std(unbiased=False) * n_comparisons,
    }
    return loss_sum, metrics


class RMLoss:
    """The engine's loss: one unit per comparison (prompt)."""

    def __init__(self, use_margins: bool = True):
        self.use_margins = use_margins

    def units(self, batch: ComparisonBatch) -> int:
        return batch.n_comparisons

    def __call__(self, model: torch.nn.Module, batch: ComparisonBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows = batch.batch
        rewards = model(rows.input_ids, rows.attention_mask, rows.position_ids, rows.ends)  # [R], every answer once
        better, worse, group = batch.pair_indices()
        margins = batch.margins if self.use_margins else None
        return comparison_loss(rewards, better, worse, group, batch.n_comparisons, margins)


def collate_for_rm(chunk: Sequence[Comparison], pad_id: int, use_margins: bool, pack_to: int = 0, share_prompts: bool = False) -> ComparisonBatch:
    """Comparison rows; in a batch where only some pairs carry a margin, the others get margin 0 (not none).

    `pack_to` > 0 packs all answers into rows of at most that many tokens (`collate_packed`), whose `ends`
    keep the answers' order, so `pair_indices()` holds for packed and padded rows alike.
    """
    batch = collate_comparisons(chunk, pad_id, pack_to, share_prompts)
    if not use_margins:
        batch.margins = None
    elif batch.margins is None and any(c.margin is not None for c in chunk):
        batch.margins = torch.tensor([c.margin or 0.0 for c in chunk], dtype=torch.float32)
    return batch


# --- evaluation -------------------------------------------------------------------------------------------


def preference_metrics(better: torch.Tensor, worse: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """Pair-level accuracy, mean margin, BT loss and calibration of rewards of labelled-better / worse answers [P].

    σ(r_b − r_w) is the model's probability that the labelled-better answer wins. As every label says
    "better wins", calibration is measured on the predicted winner (top-label ECE): confidence
    max(p, 1 − p), correct when p > 0.5.
    """
    diff = (better - worse).double()
    p = torch.sigmoid(diff)
    return {
        "pairs": int(diff.numel()),
        "accuracy": (diff > 0).double().mean().item(),
        "margin": diff.mean().item(),
        "loss": (-F.logsigmoid(diff)).mean().item(),
        "ece": expected_calibration_error(torch.maximum(p, 1 - p), diff > 0, bins),
    }


def pairs_of(sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (better, worse) of all ordered pairs when comparisons of `sizes` answers are laid end to end."""
    better, worse, offset = [], [], 0
    for size in sizes:
        for i in range(size):
            for j in range(i + 1, size):
                better.append(offset + i)
                worse.append(offset + j)
        offset += size
    return torch.tensor(better, dtype=torch.long), torch.tensor(worse, dtype=torch.long)


def evaluate_comparisons(model: RewardModel, comparisons: Sequence[Comparison]) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of tokenised comparisons on raw rewards, and the raw reward of every answer (in order)."""
    raw = model.rewards_of([r for c in comparisons for r in c.responses], normalised=False)
    better, worse = pairs_of([len(c.responses) for c in comparisons])
    return {"comparisons": len(comparisons), **preference_metrics(raw[better], raw[worse])}, raw


def evaluate_records(scorer: Scorer, records: Sequence[PreferencePair | Ranking]) -> dict[str, float]:
    """Metrics of any scorer on pairs/rankings; a reward model is judged on its raw (unnormalised) rewards."""
    prompts: list[Prompt] = []
    completions: list[str] = []
    sizes = []
    for record in records:
        answers = [record.chosen, record.rejected] if isinstance(record, PreferencePair) else list(record.responses)
        prompts += [record.prompt] * len(answers)
        completions += answers
        sizes.append(len(answers))
    scores = scorer.raw_scores(prompts, completions) if isinstance(scorer, RewardModel) else scorer.score(prompts, completions)
    scores = torch.as_tensor(scores).float().cpu()
    better, worse = pairs_of(sizes)
    return {"comparisons": len(records), **preference_metrics(scores[better], scores[worse])}


# --- train ------------------------------------------------------------------------------------------------


def encode_for(
    model: RewardModel, records: Sequence[PreferencePair | Ranking], max_length: int
) -> tuple[list[Comparison], TruncationReport]:
    """Tokenise comparisons for this reward model (an encoder gets its [CLS]/[SEP] around each answer)."""
    prefix, suffix = model.special_tokens()
    comparisons, report = encode_comparisons(model.tokenizer, records, max_length - len(prefix) - len(suffix))
    for comparison in comparisons:
        comparison.responses = [model.wrap(r) for r in comparison.responses]
    return comparisons, report


@locks_output
def run_train(config: RMConfig) -> dict[str, Any]:
    accelerator = make_accelerator(config)
    log = accelerator.print
    model = build_reward_model(
        config.model,
        backbone=config.backbone,
        pooling=None if config.pooling == "auto" else config.pooling,
        lora=config.lora(),
        gradient_checkpointing=config.gradient_checkpointing,
        lean=config.lean_activations,
        trust_remote_code=config.trust_remote_code,
        max_length=config.length(),
        batch_size=config.eval_batch_size,
        packing=config.packing,
    )
    tokenizer = model.tokenizer
    log(f"reward model on {config.model} ({config.backbone}, pooling {model.pooling}): {describe(model)}")
    pack_to = config.length() if model.packs() else 0
    if config.packing and not pack_to:
        log("packing off: it needs a causal backbone read at the last token whose attention keeps packed sequences apart")
    share_prompts = bool(pack_to) and config.share_prompts and model.shares_prompts()
    if pack_to and config.share_prompts and not share_prompts:
        log("shared prompts off: this model's attention does not take the mask that keeps a prompt's answers apart")
    records, eval_records = config.load_train_eval("comparison", config.seed, log)
    comparisons, cut = encode_for(model, records, config.length())
    log("train: " + cut.summary())
    eval_comparisons, eval_cut = encode_for(model, eval_records, config.length())
    if eval_records:
        log("held-out: " + eval_cut.summary())

    pad_id = tokenizer.pad_token_id
    collate = lambda chunk: collate_for_rm(chunk, pad_id, config.use_margins, pack_to, share_prompts)  # noqa: E731
    stream = Shuffled(comparisons, config.batch_size, collate, config.seed)
    n_pairs = sum(len(c.responses) * (len(c.responses) - 1) // 2 for c in comparisons)
    extra: dict[str, Any] = {
        "train_comparisons": len(comparisons),
        "train_pairs": n_pairs,
        "truncation": cut.summary(),
        "packing": bool(pack_to),
        "shared_prompts": share_prompts,
        **describe(model),
    }

    def save_final(trained: RewardModel, output: Path) -> None:
        if eval_comparisons:
            extra["eval"], raw = evaluate_comparisons(trained, eval_comparisons)
            reference, source = raw[: config.norm_samples], "held-out"
        else:
            answers = [r for c in comparisons for r in c.responses]
            random.Random(config.seed).shuffle(answers)
            reference, source = trained.rewards_of(answers[: config.norm_samples], normalised=False), "train"
        if config.norm_samples > 0:
            trained.normalisation = Normalisation.fit(reference, source)
        extra["normalisation"] = asdict(trained.normalisation)
        trained.save(output, tokenizer, base_model=config.model, data=config.data)

    result = train(
        algorithm="rm",
        config=config,
        full_config=config,
        model=model,
        loss_fn=RMLoss(config.use_margins),
        stream=stream,
        save_final=save_final,
        accelerator=accelerator,
        extra_summary=extra,
    )
    summary = {**vars(result), **extra}
    held_out = ""
    if "eval" in extra:
        e = extra["eval"]
        held_out = f", held-out accuracy {e['accuracy']:.3f} (margin {e['margin']:.3f}, ECE {e['ece']:.3f}, {e['pairs']} pairs)"
    log(
        f"done: {result.steps} steps, loss {result.final_loss:.4f}, {result.tokens_per_s:.0f} tokens/s, "
        f"peak memory {result.peak_memory_mb:.0f} MiB{held_out}; reward model saved in {Path(config.output) / 'model'}"
    )
    return summary


# --- eval and score ---------------------------------------------------------------------------------------


def _load_scorer(config: RMConfig) -> Scorer:
    scorer = load_scorer(config.model, batch_size=config.eval_batch_size)
    members = scorer.scorers.values() if isinstance(scorer, CombinedReward) else [scorer]
    for member in members:
        if isinstance(member, RewardModel):
            member.progress = config.progress
            member.packing = config.packing
            if config.max_length:
                member.max_length = config.max_length  # else the length it was trained with
    return scorer


def run_eval(config: RMConfig) -> dict[str, Any]:
    scorer = _load_scorer(config)
    records, report = load_records(
        config.data, "comparison", field_map=config.field_mapping(), skip_invalid=config.skip_invalid, limit=config.limit or None
    )
    print(report.summary(), file=sys.stderr)
    result = {"model": config.model, "data": config.data, **evaluate_records(scorer, records)}  # type: ignore[arg-type]
    print(
        f"{result['comparisons']} comparisons, {result['pairs']} pairs: accuracy {result['accuracy']:.4f}, "
        f"margin {result['margin']:.4f}, loss {result['loss']:.4f}, ECE {result['ece']:.4f}"
    )
    if config.output:
        out = Path(config.output)
        out = out if out.suffix == ".json" else out / "rm_eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    return result


def _completions(row: dict) -> tuple[list[str], bool]:
    """The answers a row asks to score and whether they came as a list (`completions`, from `generate`)."""
    if "completions" in row:
        value = row["completions"]
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise InvalidRecord("field 'completions' must be a list of strings")
        return value, True
    if "messages" in row:
        last = row["messages"][-1] if isinstance(row["messages"], list) and row["messages"] else None
        is_reply = isinstance(last, dict) and last.get("role") in ("assistant", "gpt", "bot")
        if not is_reply or not isinstance(last.get("content"), str):
            raise InvalidRecord("'messages' must end with an assistant turn to score")
        return [last["content"]], False
    for key in ("completion", "response", "output"):
        if key in row:
            if not isinstance(row[key], str):
                raise InvalidRecord(f"field '{key}' must be a string")
            return [row[key]], False
    raise InvalidRecord(
        "nothing to score: expected 'completion' (or 'response', 'output'), a 'completions' list, "
        "or 'messages' ending with an assistant turn"
    )


def read_rows_to_score(config: RMConfig) -> tuple[list[dict], list[Prompt], list[list[str]], list[bool]]:
    """Rows (as read), their prompts, their answers and whether each row held a list of answers."""
    mapping = config.field_mapping()
    rows, prompts, answers, listed = [], [], [], []
    skipped = 0
    for number, row in read_rows(config.data):
        try:
            if isinstance(row, InvalidRecord):
                raise row
            if not isinstance(row, dict):
                raise InvalidRecord(f"a record must be a JSON object, not {type(row).__name__}")
            fields = {mapping.get(k, k): v for k, v in row.items()}
            prompt = parse_prompt(fields).prompt
            texts, many = _completions(fields)
        except InvalidRecord as exc:
            if not config.skip_invalid:
                fix = "fix or remove this row, or pass --skip-invalid"
                raise DataError(str(exc), path=config.data, line=number, fix=fix) from None
            skipped += 1
            continue
        rows.append(dict(row))
        prompts.append(prompt)
        answers.append(texts)
        listed.append(many)
        if config.limit and len(rows) >= config.limit:
            break
    if not rows:
        raise DataError("no rows to score", path=config.data)
    if skipped:
        print(f"{config.data}: skipped {skipped} invalid rows", file=sys.stderr)
    return rows, prompts, answers, listed


def run_score(config: RMConfig) -> list[dict]:
    scorer = _load_scorer(config)
    rows, prompts, answers, listed = read_rows_to_score(config)
    flat_prompts = [p for p, texts in zip(prompts, answers) for _ in texts]
    flat_answers = [t for texts in answers for t in texts]
    if isinstance(scorer, CombinedReward):
        unsafe = [row.get("unsafe") is True for row, texts in zip(rows, answers) for _ in texts]
        scores = scorer.score(flat_prompts, flat_answers, unsafe=unsafe)
    else:
        scores = scorer.score(flat_prompts, flat_answers)
    values = torch.as_tensor(scores).float().cpu().tolist()
    position = 0
    for row, texts, many in zip(rows, answers, listed):
        mine = values[position : position + len(texts)]
        position += len(texts)
        if many:
            row["rewards"] = mine
        else:
            row["reward"] = mine[0]
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if config.output == "-":
        sys.stdout.write(lines)
    else:
        out = Path(config.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(lines, encoding="utf-8")
        tmp.replace(out)
        mean = sum(values) / max(len(values), 1)
        print(f"scored {len(values)} completions of {len(rows)} rows (mean reward {mean:.4f}); wrote {out}", file=sys.stderr)
    return rows


def run_rm(config: RMConfig) -> Any:
    """`alignkit rm --action train|eval|score`."""
    if config.action == "eval":
        return run_eval(config)
    if config.action == "score":
        return run_score(config)
    return run_train(config)
