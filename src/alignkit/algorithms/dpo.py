"""Offline preference optimisation: DPO and its family (cDPO, robust DPO, IPO, hinge/SLiC, SimPO, ORPO).

Each method is one loss in `alignkit.losses.preference`; this file feeds it. Chosen and rejected responses
go through the policy in one forward pass. The reference log-probs come either from one pass, before
training, over the pairs the run trains on (the starting policy *is* the reference, so no second model is
ever loaded; cached on disk) or, with LoRA, from the same model with its adapter switched off
(`--reference lora-base`). SimPO and ORPO need no reference, and none is computed.

On-policy DPO (`--prompts`, `--scorer`): the pairs are made first from the starting model's own samples, K per
prompt, the best-scoring completion chosen and the worst rejected (`onpolicy_pairs`; the highest- and
lowest-scoring pair of Self-Rewarding LMs, Yuan et al. 2024, and of iterative DPO, Dong et al. 2024), then
training runs on them exactly as on a `--data` file. One round: the samples come from the starting model only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit.config import above, at_least, within
from alignkit.data.comparisons import Comparison, ComparisonBatch, collate_comparisons, encode_comparisons
from alignkit.data.records import PreferencePair, Ranking
from alignkit.data.tokenize import IGNORE
from alignkit.engine import EngineConfig, Shuffled, disk_full_reported, items_trained_on, make_accelerator, train
from alignkit.errors import AlignkitError
from alignkit.generation import sample_best_of
from alignkit.io import locks_output, write_jsonl
from alignkit.logprobs import TokenLogprobModel, batch_logprobs
from alignkit.losses import preference as L
from alignkit.losses.preference import PreferenceLoss
from alignkit.models import describe, evaluating, load_tokenizer, save_model
from alignkit.options import DataOptions, ModelOptions, ScorerOptions
from alignkit.reference import held_out_cache, item_reference_logprobs, reference_cache

DEFAULT_BETA = {PreferenceLoss.SIMPO: 2.0}


@dataclass
class DPOConfig(EngineConfig, DataOptions, ModelOptions, ScorerOptions):
    """Options of `alignkit dpo`."""

    loss: Literal["dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo"] = "dpo"
    """preference loss: dpo, cdpo (label smoothing), robust, ipo, hinge (SLiC), simpo (no reference), orpo (no reference, with SFT term)"""
    beta: float | None = above(0, None)
    """strength of the KL constraint / reward scale (default 0.1; 2.0 for simpo)"""
    label_smoothing: float = within("[0, 0.5)", 0.1)
    """cdpo and robust: assumed probability ε that a preference label is flipped"""
    simpo_gamma: float = at_least(0, 0.5)
    """simpo: target reward margin γ"""
    orpo_lambda: float = at_least(0, 0.1)
    """orpo: weight λ of the odds-ratio term added to the chosen NLL"""
    ipo_length_average: bool = True
    """ipo: use length-averaged log-probs (as TRL does) rather than sums"""
    reference: Literal["precompute", "lora-base"] = "precompute"
    """where reference log-probs come from: one pass before training (cached), or the LoRA base model each step"""
    reference_cache: str = ""
    """file of precomputed reference log-probs (default: OUTPUT/reference_logps.pt); reused when it matches"""
    lr: float = 1e-6
    """peak learning rate of AdamW"""
    max_length: int = at_least(1, 512)
    """longest prompt + response in tokens; longer ones are cut and the cut is reported"""
    padding_free: bool = True
    """lay each micro-batch's responses end to end in rows of at most --max-length (restarting positions, no
    padding): the same log-probs as right-padded rows, less compute and memory"""
    share_prompts: bool = True
    """with --padding-free, put a pair's prompt in a row once for both responses, each seeing only the prompt
    and itself (sdpa or eager attention): the same log-probs, the prompt's work done once"""
    prompts: str = ""
    """on-policy DPO, instead of --data: prompts to sample from (any file with prompt/instruction/question/messages
    rows); --model answers each --num-samples times, and its best- and worst-scoring answers by --scorer make a
    pair, written to OUTPUT/onpolicy_pairs.jsonl (reused by a rerun; --overwrite samples again)"""
    scorer: str = ""
    """with --prompts: the scorer that ranks the samples: ifeval, gsm8k, exact, format, python:module:function,
    rm:PATH, or a weighted sum"""
    num_samples: int = at_least(2, 8, why="a pair is the best and the worst of them")
    """with --prompts: K, completions sampled per prompt"""
    prompt_limit: int = at_least(0, 0)
    """with --prompts: use only the first N prompts (0: all)"""
    sample_temperature: float = above(0, 0.8, why="greedy samples of one prompt are all the same")
    """with --prompts: sampling temperature of the K completions"""
    sample_max_new_tokens: int = at_least(1, 256)
    """with --prompts: longest sampled completion in tokens"""
    cut_penalty: float = at_least(0, 0.0)
    """with --prompts: subtracted from the score of a sample cut at --sample-max-new-tokens before the best and the
    worst are picked; e.g. 1 for a 0-1 scorer: a finished answer is preferred to one that loops to the cap"""

    @property
    def kind(self) -> PreferenceLoss:
        return PreferenceLoss(self.loss)

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.kind, 0.1)

    def validate(self) -> None:
        if self.prompts:
            self._validate_onpolicy()
        else:
            self.require_data()
            if self.scorer or self.cut_penalty:
                raise AlignkitError("--scorer and --cut-penalty rank samples of --prompts",
                                    fix="add --prompts FILE, or leave them out to train on --data")
        if not self.output:
            raise AlignkitError("no output directory given", fix="pass --output DIR")
        if self.reference == "lora-base" and self.lora_r <= 0:
            raise AlignkitError("--reference lora-base needs a LoRA adapter", fix="add --lora-r 16 (or use --reference precompute)")

    def _validate_onpolicy(self) -> None:
        if self.data:
            raise AlignkitError("give --data (pairs you have) or --prompts (pairs sampled from --model), not both")
        if not self.scorer:
            raise AlignkitError("--prompts needs a --scorer to rank the samples", fix="e.g. --scorer ifeval")


@dataclass
class PairLogps:
    """Per-pair quantities of one batch, all [P]."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None


def pair_logps(model: torch.nn.Module, cb: ComparisonBatch, reference: str, needs_reference: bool) -> PairLogps:
    """Summed log-probs of chosen (even rows) and rejected (odd rows) responses, policy and reference."""
    lengths = cb.batch.example_sums((cb.batch.labels != IGNORE).float())
    sums = cb.batch.example_sums(batch_logprobs(model, cb.batch))
    ref = None
    if needs_reference:
        if cb.ref_logps is not None:
            ref = cb.ref_logps
        elif reference == "lora-base":
            inner = getattr(model, "module", model)  # bypass DDP: this pass needs no gradient sync
            with torch.no_grad(), inner.model.disable_adapter():
                ref = cb.batch.example_sums(batch_logprobs(inner, cb.batch))
        else:
            raise RuntimeError("reference log-probs were neither precomputed nor requested from the LoRA base")
    return PairLogps(
        sums[0::2], sums[1::2], lengths[0::2], lengths[1::2],
        None if ref is None else ref[0::2], None if ref is None else ref[1::2],
    )  # fmt: skip


def preference_loss(config: DPOConfig, p: PairLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit rewards of chosen and rejected (β·log-ratio; β·avg log-prob without reference)."""
    kind, beta = config.kind, config.effective_beta
    if not kind.needs_reference:
        avg_c, avg_r = p.chosen / p.chosen_len, p.rejected / p.rejected_len
        if kind is PreferenceLoss.SIMPO:
            loss = L.simpo_loss(avg_c, avg_r, beta=beta, gamma=config.simpo_gamma)
        else:
            loss = L.orpo_loss(avg_c, avg_r, -avg_c, lam=config.orpo_lambda)
        return loss, beta * avg_c.detach(), beta * avg_r.detach()
    pc, pr, rc, rr = p.chosen, p.rejected, p.ref_chosen, p.ref_rejected
    if kind is PreferenceLoss.IPO and config.ipo_length_average:
        pc, pr, rc, rr = pc / p.chosen_len, pr / p.rejected_len, rc / p.chosen_len, rr / p.rejected_len
    losses = {
        PreferenceLoss.DPO: lambda: L.dpo_loss(pc, pr, rc, rr, beta=beta),
        PreferenceLoss.CDPO: lambda: L.cdpo_loss(pc, pr, rc, rr, beta=beta, eps=config.label_smoothing),
        PreferenceLoss.ROBUST: lambda: L.robust_dpo_loss(pc, pr, rc, rr, beta=beta, eps=config.label_smoothing),
        PreferenceLoss.IPO: lambda: L.ipo_loss(pc, pr, rc, rr, beta=beta),
        PreferenceLoss.HINGE: lambda: L.hinge_loss(pc, pr, rc, rr, beta=beta),
    }
    return (
        losses[kind](),
        L.implicit_rewards(p.chosen, p.ref_chosen, beta).detach(),
        L.implicit_rewards(p.rejected, p.ref_rejected, beta).detach(),
    )


class DPOLoss:
    """Sum over the batch's pairs of the chosen preference loss; the engine divides by the number of pairs."""

    def __init__(self, config: DPOConfig):
        self.config = config

    def units(self, batch: ComparisonBatch) -> int:
        return batch.n_comparisons

    def __call__(self, model: torch.nn.Module, batch: ComparisonBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = pair_logps(model, batch, self.config.reference, self.config.kind.needs_reference)
        loss, reward_c, reward_r = preference_loss(self.config, p)
        metrics = {
            "rewards/chosen": reward_c.sum(),
            "rewards/rejected": reward_r.sum(),
            "rewards/accuracy": (reward_c > reward_r).float().sum(),
            "rewards/margin": (reward_c - reward_r).sum(),
            "logps/chosen": p.chosen.detach().sum(),
            "logps/rejected": p.rejected.detach().sum(),
            "length/chosen": p.chosen_len.sum(),
            "length/rejected": p.rejected_len.sum(),
        }
        return loss.sum(), metrics


def as_pairs(records: list) -> list[PreferencePair]:
    """Rankings become all the pairs they imply; pairs stay as they are."""
    pairs: list[PreferencePair] = []
    for record in records:
        pairs.extend(record.pairs() if isinstance(record, Ranking) else [record])
    return pairs


@torch.no_grad()
def evaluate_pairs(model: TokenLogprobModel, config: DPOConfig, comparisons: list[Comparison], pad_id: int) -> dict[str, float]:
    """Held-out loss and preference accuracy of the implicit reward (a tie counts half)."""
    device = next(model.parameters()).device
    total_loss, correct, margin = 0.0, 0.0, 0.0
    with evaluating(model):
        for start in range(0, len(comparisons), config.batch_size):
            cb = collate_comparisons(comparisons[start : start + config.batch_size], pad_id).to(device)
            loss, reward_c, reward_r = preference_loss(config, pair_logps(model, cb, config.reference, config.kind.needs_reference))
            total_loss += loss.sum().item()
            correct += ((reward_c > reward_r).float() + 0.5 * (reward_c == reward_r).float()).sum().item()
            margin += (reward_c - reward_r).sum().item()
    n = max(len(comparisons), 1)
    return {"loss": total_loss / n, "accuracy": correct / n, "margin": margin / n}


def attach_reference(
    policy: TokenLogprobModel, config: DPOConfig, comparisons: list[Comparison], pad_id: int, cache: Path,
    needed: set[int] | None = None,
) -> None:  # fmt: skip
    """Reference log-probs of the responses of the `needed` comparisons (default: all); NaN for the others."""
    starts = [0]
    for c in comparisons:
        starts.append(starts[-1] + len(c.responses))
    responses = [r for c in comparisons for r in c.responses]
    owned = [list(range(starts[i], starts[i + 1])) for i in range(len(comparisons))]
    logps = item_reference_logprobs(policy, config.model, responses, owned, pad_id, cache, config.batch_size, needed)
    for c, mine in zip(comparisons, logps):
        c.ref_logps = mine


def onpolicy_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A preference pair per best-of-K row (`generation.best_of_n`): its best-scoring completion chosen, its
    worst rejected.

    Ties go to the first completion: chosen is the first of those with the highest score, rejected the first of
    those with the lowest. Blank completions are left out first (a pair file cannot hold an empty response), and
    a row gives no pair when the rest are fewer than two, all score the same (nothing to prefer), or the chosen
    and rejected texts differ only in surrounding whitespace. Each pair: `prompt`, `chosen`, `rejected`,
    `chosen_score`, `rejected_score`.
    """
    pairs = []
    for row in rows:
        usable = [i for i, text in enumerate(row["completions"]) if text.strip()]
        if len(usable) < 2:
            continue
        # max/min return the first index among equals: the documented tie-break.
        best = max(usable, key=lambda i: row["scores"][i])
        worst = min(usable, key=lambda i: row["scores"][i])
        chosen, rejected = row["completions"][best], row["completions"][worst]
        if row["scores"][best] == row["scores"][worst] or chosen.strip() == rejected.strip():
            continue
        pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                      "chosen_score": row["scores"][best], "rejected_score": row["scores"][worst]})  # fmt: skip
    return pairs


def sample_onpolicy_pairs(config: DPOConfig, pairs_file: Path) -> None:
    """Sample --num-samples completions per prompt from --model, score them, and write their pairs to `pairs_file`."""
    rows = sample_best_of(
        config.model, config.prompts, n=config.num_samples, scorer=config.scorer, temperature=config.sample_temperature,
        max_new_tokens=config.sample_max_new_tokens, seed=config.seed, limit=config.prompt_limit,
        trust_remote_code=config.trust_remote_code, reward_timeout=config.reward_timeout, cut_penalty=config.cut_penalty,
    )  # fmt: skip
    pairs = onpolicy_pairs(rows)
    if not pairs:
        raise AlignkitError(
            f"none of the {len(rows)} prompts gave a pair: --scorer {config.scorer} scored each prompt's "
            f"{config.num_samples} samples alike (or fewer than two were non-blank)",
            fix="raise --num-samples or --sample-temperature, or use a scorer that tells the samples apart",
        )
    write_jsonl(pairs, str(pairs_file))
    print(f"on-policy pairs: {len(pairs)} of {len(rows)} prompts gave a pair ({len(rows) - len(pairs)} gave none: their "
          f"{config.num_samples} samples scored alike, or fewer than two were non-blank) -> {pairs_file}")  # fmt: skip


@locks_output
def run_dpo(config: DPOConfig) -> dict:
    if config.prompts:
        pairs_file = Path(config.output) / "onpolicy_pairs.jsonl"
        if config.overwrite or not pairs_file.exists():
            sample_onpolicy_pairs(config, pairs_file)
        else:
            print(f"on-policy pairs: reusing {pairs_file} (--overwrite samples again)")
        config = dataclasses.replace(config, data=str(pairs_file))
    accelerator = make_accelerator(config)
    log = accelerator.print
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    records, eval_records = config.load_train_eval("comparison", config.seed, log)
    comparisons, cut = encode_comparisons(tokenizer, as_pairs(records), config.max_length)
    log("train: " + cut.summary())
    eval_comparisons, _ = encode_comparisons(tokenizer, as_pairs(eval_records), config.max_length)

    policy = config.build_policy()
    log(f"model {config.model}: {describe(policy)}; loss {config.loss}, beta {config.effective_beta}")
    output = Path(config.output)
    pack_to = config.max_length if config.padding_free and policy.keeps_packed_sequences_apart() else 0
    if config.padding_free and not pack_to:
        log("padding-free batches off: this model's attention lets sequences laid end to end see each other")
    share_prompts = bool(pack_to) and config.share_prompts and policy.keeps_packed_sequences_apart(shared_prompts=True)
    if pack_to and config.share_prompts and not share_prompts:
        log("shared prompts off: this model's attention does not take the mask that keeps a prompt's responses apart")
    stream = Shuffled(comparisons, config.batch_size, lambda chunk: collate_comparisons(chunk, pad_id, pack_to, share_prompts), config.seed)
    if config.kind.needs_reference and config.reference == "precompute":
        cache = reference_cache(output, config.reference_cache, config.overwrite)
        trained_on = items_trained_on(config, stream, accelerator.num_processes)
        log(f"reference log-probs of the {len(trained_on)} pairs this run trains on: {cache}")
        with disk_full_reported(output):
            attach_reference(policy, config, comparisons, pad_id, cache, trained_on)
            if eval_comparisons:
                attach_reference(policy, config, eval_comparisons, pad_id, held_out_cache(cache))

    extra: dict = {"train_pairs": len(comparisons), "truncation": cut.summary(), **describe(policy)}
    if eval_comparisons and not (output / "summary.json").exists():
        extra["eval_before"] = evaluate_pairs(policy, config, eval_comparisons, pad_id)

    def save_final(trained: TokenLogprobModel, out: Path) -> None:
        save_model(trained.model, tokenizer, out)
        if eval_comparisons:
            extra["eval_after"] = evaluate_pairs(trained, config, eval_comparisons, pad_id)

    result = train(
        algorithm=f"dpo-{config.loss}",
        config=config,
        full_config=config,
        model=policy,
        loss_fn=DPOLoss(config),
        stream=stream,
        save_final=save_final,
        accelerator=accelerator,
        extra_summary=extra,
    )
    summary = {**vars(result), **extra}
    evals = ""
    if "eval_before" in extra and "eval_after" in extra:
        evals = f", held-out preference accuracy {extra['eval_before']['accuracy']:.3f} -> {extra['eval_after']['accuracy']:.3f}"
    log(
        f"done: {result.steps} steps, loss {result.final_loss:.4f}, {result.tokens_per_s:.0f} tokens/s, "
        f"peak memory {result.peak_memory_mb:.0f} MiB{evals}; model saved in {output / 'model'}"
    )
    return summary
