"""Supervised fine-tuning: next-token loss on the assistant's tokens only (prompt tokens are masked).

Loss = −(1/N) Σ log p(y_t | y_<t, x) over the N response tokens of the whole optimiser step, so a long answer
weighs more than a short one (token-level averaging, as in InstructGPT's SFT and TRL's default).

Mid-training (MiniCPM's two-phase recipe, Hu et al. 2024): with `--mix-data` the stable phase of a
warmup-stable-decay schedule trains on the plain-text stream only; during the decay phase each micro-batch is
drawn from the instruction data with probability `--mix-ratio`, else from the text stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.data.loading import load_records
from alignkit.data.records import PlainText
from alignkit.data.tokenize import IGNORE, Batch, Example, collate, collate_packed, encode_conversations, encode_text, pack, truncate
from alignkit.engine import EngineConfig, PhaseMix, Shuffled, make_accelerator, total_steps, train
from alignkit.errors import AlignkitError
from alignkit.io import locks_output
from alignkit.logprobs import TokenLogprobModel, batch_logprobs, mean_nll
from alignkit.models import describe, load_tokenizer, save_model
from alignkit.config import within
from alignkit.options import DataOptions, ModelOptions


@dataclass
class SFTConfig(EngineConfig, DataOptions, ModelOptions):
    """Options of `alignkit sft`."""

    packing: bool = False
    """pack several short examples into each row (attention never crosses example boundaries: checked at start-up,
    and a model whose attention would let packed examples see each other is refused)"""
    padding_free: bool = True
    """lay each micro-batch's rows end to end in rows of at most --max-length (restarting positions, no padding):
    the same examples and loss as right-padded rows, less compute and memory"""
    train_on: str = "all"
    """which assistant turns are trained on: all, or last (only the final reply)"""
    mix_data: str = ""
    """mid-training: a plain-text stream ({"text": ...} per line) trained on before and during the decay phase"""
    mix_ratio: float = within("[0, 1]", 0.3)
    """mid-training: fraction of decay-phase micro-batches drawn from --data (needs --scheduler wsd)"""
    lr: float = 2e-5
    """peak learning rate of AdamW"""

    def validate(self) -> None:
        self.require_data()
        if not self.output:
            raise AlignkitError("no output directory given", fix="pass --output DIR")
        if self.train_on not in ("all", "last"):
            raise AlignkitError(f"--train-on must be all or last, not {self.train_on!r}")
        if self.mix_data and self.scheduler != "wsd":
            raise AlignkitError("--mix-data mixes data during the decay phase", fix="add --scheduler wsd")


class SFTLoss:
    """Summed negative log-likelihood of the response tokens; the engine divides by their number."""

    def units(self, batch) -> int:
        return batch.n_targets

    def __call__(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = batch_logprobs(model, batch)
        return -logps.sum(), {}


def text_windows(tokenizer, records: list[PlainText], max_length: int) -> list[Example]:
    """Pre-training text is split into windows of `max_length` tokens rather than cut: no text is lost."""
    windows = []
    for record in records:
        example = encode_text(tokenizer, record.text, origin=record.origin)
        for start in range(0, len(example), max_length):
            ids = example.input_ids[start : start + max_length]
            labels = example.labels[start : start + max_length]
            labels = labels[:-1] + [IGNORE]  # the window's last token has no next token inside it
            if any(label != IGNORE for label in labels):
                windows.append(Example(ids, labels, record.origin))
    return windows


@locks_output
def run_sft(config: SFTConfig) -> dict:
    accelerator = make_accelerator(config)
    log = accelerator.print
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    records, eval_records = config.load_train_eval("conversation", config.seed, log)

    last_only = config.train_on == "last"
    examples, cut = truncate(encode_conversations(tokenizer, records, last_only=last_only), config.max_length)
    log("train: " + cut.summary())
    eval_examples, _ = truncate(encode_conversations(tokenizer, eval_records, last_only=last_only), config.max_length)

    policy = config.build_policy()
    log(f"model {config.model}: {describe(policy)}")
    kept_apart = (config.padding_free or config.packing) and policy.keeps_packed_sequences_apart()
    if config.packing and not kept_apart:
        raise AlignkitError(
            f"--packing: the attention of {config.model} lets examples packed in one row see each other, "
            "so each would be trained on the ones before it",
            fix="drop --packing (padding-free batches are off for this model too)",
        )
    padding_free = config.padding_free and kept_apart
    if config.padding_free and not padding_free:
        log("padding-free batches off: this model's attention lets sequences laid end to end see each other")

    def batches_of(items: list[Example]) -> Shuffled:
        rows = pack(items, config.max_length) if config.packing else [[e] for e in items]
        return Shuffled(rows, config.batch_size, collate_rows, config.seed)

    def collate_rows(chunk: list[list[Example]]) -> Batch:
        if padding_free:
            return collate_packed([e for row in chunk for e in row], config.max_length, tokenizer.pad_token_id)
        return collate(chunk, tokenizer.pad_token_id)

    stream = batches_of(examples)
    if config.mix_data:
        text_records, text_report = load_records(config.mix_data, "text", skip_invalid=config.skip_invalid)
        log(text_report.summary())
        text_stream = batches_of(text_windows(tokenizer, text_records, config.max_length))
        per_step = config.grad_accum * accelerator.num_processes
        steps = total_steps(config, stream, accelerator.num_processes)
        decay_from = (steps - round(config.decay_ratio * steps)) * per_step
        stream = PhaseMix(text_stream, stream, lambda g: config.mix_ratio if g >= decay_from else 0.0, config.seed)

    def evaluate(current: TokenLogprobModel) -> float:
        return mean_nll(current, eval_examples, tokenizer.pad_token_id, config.batch_size)

    extra = {"train_examples": len(examples), "truncation": cut.summary(), **describe(policy)}
    if eval_examples and not (Path(config.output) / "summary.json").exists():
        extra["eval_loss_before"] = evaluate(policy)

    def save_final(trained: TokenLogprobModel, output: Path) -> None:
        save_model(trained.model, tokenizer, output)
        if eval_examples:
            extra["eval_loss_after"] = evaluate(trained)

    result = train(
        algorithm="sft",
        config=config,
        full_config=config,
        model=policy,
        loss_fn=SFTLoss(),
        stream=stream,
        save_final=save_final,
        accelerator=accelerator,
        extra_summary=extra,
    )
    summary = {**vars(result), **extra}
    log(
        f"done: {result.steps} steps, loss {result.final_loss:.4f}, {result.tokens_per_s:.0f} tokens/s, "
        f"peak memory {result.peak_memory_mb:.0f} MiB"
        + (f", held-out loss {extra['eval_loss_before']:.4f} -> {extra['eval_loss_after']:.4f}" if "eval_loss_after" in extra and "eval_loss_before" in extra else "")
        + f"; model saved in {Path(config.output) / 'model'}"
    )
    return summary
