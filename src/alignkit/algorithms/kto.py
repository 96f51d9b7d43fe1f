"""KTO (Ethayarajh et al. 2024): preference optimisation from unpaired desirable / undesirable completions.

The reference point z0 is an estimate of KL(policy ‖ reference), taken on *mismatched* prompt/completion
pairs: each example's prompt is paired with another example's completion (a fixed derangement chosen at load
time, so its reference log-prob can be precomputed like the others). z0 is detached and clamped at 0. Paired
preference data is unpaired automatically: the chosen reply becomes desirable, the rejected one undesirable.
Reference log-probs are computed once before training from the starting policy and cached, as in DPO.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import above, at_least
from alignkit.data.loading import read_rows
from alignkit.data.records import LabelledCompletion, PreferencePair
from alignkit.data.tokenize import Batch, Example, TruncationReport, collate, encode_prompt_completion, truncate_together
from alignkit.engine import EngineConfig, Shuffled, disk_full_reported, items_trained_on, make_accelerator, train
from alignkit.errors import AlignkitError
from alignkit.io import locks_output
from alignkit.logprobs import TokenLogprobModel, batch_logprobs
from alignkit.losses.preference import kto_loss
from alignkit.models import describe, evaluating, load_tokenizer, save_model
from alignkit.options import DataOptions, ModelOptions
from alignkit.reference import held_out_cache, item_reference_logprobs, reference_cache


@dataclass
class KTOConfig(EngineConfig, DataOptions, ModelOptions):
    """Options of `alignkit kto`."""

    beta: float = above(0, 0.1)
    """strength of the KL constraint / reward scale"""
    desirable_weight: float = at_least(0, 1.0)
    """λ_D, weight of desirable examples (the paper keeps λ_D·n_D / (λ_U·n_U) between 1 and 4/3)"""
    undesirable_weight: float = at_least(0, 1.0)
    """λ_U, weight of undesirable examples"""
    reference_cache: str = ""
    """file of precomputed reference log-probs (default: OUTPUT/reference_logps.pt); reused when it matches"""
    lr: float = 1e-6
    """peak learning rate of AdamW"""

    def validate(self) -> None:
        self.require_data()
        if not self.output:
            raise AlignkitError("no output directory given", fix="pass --output DIR")


@dataclass
class KTOExample:
    matched: Example
    mismatched: Example
    """this example's prompt with another example's completion, for the KL estimate"""
    desirable: bool
    ref: tuple[float, float] | None = None
    """reference log-probs of (matched, mismatched)"""


@dataclass
class KTOBatch:
    matched: Batch
    mismatched: Batch
    desirable: torch.Tensor
    ref_matched: torch.Tensor
    ref_mismatched: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.matched.n_tokens + self.mismatched.n_tokens

    def to(self, device: torch.device | str) -> "KTOBatch":
        return KTOBatch(
            self.matched.to(device), self.mismatched.to(device), self.desirable.to(device),
            self.ref_matched.to(device), self.ref_mismatched.to(device),
        )  # fmt: skip


def collate_kto(examples: list[KTOExample], pad_id: int) -> KTOBatch:
    return KTOBatch(
        collate([[e.matched] for e in examples], pad_id),
        collate([[e.mismatched] for e in examples], pad_id),
        torch.tensor([e.desirable for e in examples]),
        torch.tensor([e.ref[0] for e in examples]),  # type: ignore[index]
        torch.tensor([e.ref[1] for e in examples]),  # type: ignore[index]
    )


def unpaired(records: list) -> list[LabelledCompletion]:
    """Labelled completions as they are; each preference pair becomes one desirable and one undesirable."""
    out: list[LabelledCompletion] = []
    for record in records:
        if isinstance(record, PreferencePair):
            out.append(LabelledCompletion(record.prompt, record.chosen, True, record.origin))
            out.append(LabelledCompletion(record.prompt, record.rejected, False, record.origin))
        else:
            out.append(record)
    return out


def data_kind(path: str) -> str:
    for _, row in read_rows(path):
        if isinstance(row, dict):
            return "preference" if "chosen" in row else "labelled"
    return "labelled"


def encode_kto(tokenizer, records: list[LabelledCompletion], max_length: int, seed: int) -> tuple[list[KTOExample], TruncationReport]:
    if len(records) < 2:
        raise AlignkitError("KTO's KL estimate pairs each prompt with another example's completion: it needs at least 2 examples")
    # A derangement: every example borrows the completion of a different example.
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    report = TruncationReport(max_length)
    examples = []
    for i, record in enumerate(records):
        matched = encode_prompt_completion(tokenizer, record.prompt, record.completion, origin=record.origin)
        borrowed = encode_prompt_completion(tokenizer, record.prompt, records[partner[i]].completion, origin=record.origin)
        kept = truncate_together([matched, borrowed], report, record.origin)
        if kept is not None:
            examples.append(KTOExample(kept[0], kept[1], record.desirable))
    return examples, report


class KTOLoss:
    def __init__(self, config: KTOConfig):
        self.config = config

    def units(self, batch: KTOBatch) -> int:
        return int(batch.desirable.numel())

    def __call__(self, model: torch.nn.Module, batch: KTOBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, rewards, kl = kto_terms(model, batch, self.config)
        agree = torch.where(batch.desirable, rewards > 0, rewards < 0).float()
        n = batch.desirable.numel()
        return losses.sum(), {"kl": kl * n, "rewards/signed": torch.where(batch.desirable, rewards, -rewards).sum(), "rewards/accuracy": agree.sum()}


def kto_terms(model: torch.nn.Module, batch: KTOBatch, config: KTOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses, implicit rewards β·(log-ratio − z0), and the KL estimate z0."""
    policy = batch_logprobs(model, batch.matched).sum(-1)
    with torch.no_grad():
        kl = (batch_logprobs(model, batch.mismatched).sum(-1) - batch.ref_mismatched).mean().clamp(min=0)
    losses = kto_loss(
        policy, batch.ref_matched, batch.desirable, kl,
        beta=config.beta, lambda_d=config.desirable_weight, lambda_u=config.undesirable_weight,
    )  # fmt: skip
    rewards = config.beta * (policy.detach() - batch.ref_matched - kl)
    return losses, rewards, kl


@torch.no_grad()
def evaluate_kto(model: TokenLogprobModel, examples: list[KTOExample], config: KTOConfig, pad_id: int) -> dict[str, float]:
    """Held-out KTO loss and how often the sign of the implicit reward agrees with the label."""
    device = next(model.parameters()).device
    loss, agree = 0.0, 0.0
    with evaluating(model):
        for start in range(0, len(examples), config.batch_size):
            batch = collate_kto(examples[start : start + config.batch_size], pad_id).to(device)
            losses, rewards, _ = kto_terms(model, batch, config)
            loss += losses.sum().item()
            agree += torch.where(batch.desirable, rewards > 0, rewards < 0).float().sum().item()
    return {"loss": loss / max(len(examples), 1), "accuracy": agree / max(len(examples), 1)}


def attach_reference(
    policy: TokenLogprobModel, config: KTOConfig, examples: list[KTOExample], pad_id: int, cache: Path,
    needed: set[int] | None = None,
) -> None:  # fmt: skip
    """Reference log-probs of the `needed` examples (default: all) and their mismatched pairs; NaN for the others."""
    sequences = [e.matched for e in examples] + [e.mismatched for e in examples]
    owned = [[i, len(examples) + i] for i in range(len(examples))]
    logps = item_reference_logprobs(policy, config.model, sequences, owned, pad_id, cache, config.batch_size, needed)
    for example, (matched, mismatched) in zip(examples, logps):
        example.ref = (matched, mismatched)


@locks_output
def run_kto(config: KTOConfig) -> dict:
    accelerator = make_accelerator(config)
    log = accelerator.print
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    records, eval_records = config.load_train_eval(data_kind(config.data), config.seed, log)  # type: ignore[arg-type]
    examples, cut = encode_kto(tokenizer, unpaired(records), config.max_length, config.seed)
    log("train: " + cut.summary())
    desirable = sum(e.desirable for e in examples)
    log(f"{desirable} desirable, {len(examples) - desirable} undesirable examples")
    eval_examples = encode_kto(tokenizer, unpaired(eval_records), config.max_length, config.seed)[0] if len(eval_records) > 1 else []

    policy = config.build_policy()
    log(f"model {config.model}: {describe(policy)}")
    output = Path(config.output)
    cache = reference_cache(output, config.reference_cache, config.overwrite)
    stream = Shuffled(examples, config.batch_size, lambda chunk: collate_kto(chunk, pad_id), config.seed)
    with disk_full_reported(output):
        attach_reference(policy, config, examples, pad_id, cache, items_trained_on(config, stream, accelerator.num_processes))
        if eval_examples:
            attach_reference(policy, config, eval_examples, pad_id, held_out_cache(cache))

    extra: dict = {"train_examples": len(examples), "desirable": desirable, "truncation": cut.summary(), **describe(policy)}
    if eval_examples and not (output / "summary.json").exists():
        extra["eval_before"] = evaluate_kto(policy, eval_examples, config, pad_id)

    def save_final(trained: TokenLogprobModel, out: Path) -> None:
        save_model(trained.model, tokenizer, out)
        if eval_examples:
            extra["eval_after"] = evaluate_kto(trained, eval_examples, config, pad_id)

    result = train(
        algorithm="kto",
        config=config,
        full_config=config,
        model=policy,
        loss_fn=KTOLoss(config),
        stream=stream,
        save_final=save_final,
        accelerator=accelerator,
        extra_summary=extra,
    )
    log(
        f"done: {result.steps} steps, loss {result.final_loss:.4f}, {result.tokens_per_s:.0f} tokens/s, "
        f"peak memory {result.peak_memory_mb:.0f} MiB; model saved in {output / 'model'}"
    )
    return {**vars(result), **extra}
