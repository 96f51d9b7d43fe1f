"""Preference pairs and K-way rankings as token batches: every response of a prompt is one row.

A pair is a ranking of two (chosen first), so reward models, DPO and its variants share one layout: the
responses of comparison g occupy rows `offsets[g] : offsets[g] + sizes[g]`, best first. Chosen and rejected
go through the model in the same forward pass, and each answer of a K-way ranking is encoded once however
many of the C(K, 2) pairs it takes part in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from alignkit.data.records import PreferencePair, Ranking
from alignkit.data.tokenize import (
    Batch,
    Example,
    TruncationReport,
    collate,
    collate_packed,
    collate_packed_shared,
    encode_prompt_completion,
    truncate_together,
)


@dataclass
class Comparison:
    """A prompt's tokenised responses, best first, with an optional margin and reference log-probs."""

    responses: list[Example]
    margin: float | None = None
    origin: str = ""
    ref_logps: list[float] | None = None
    """summed log-probs of each response under the reference model, when precomputed"""

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.responses)


@dataclass
class ComparisonBatch:
    """Rows of all responses of G comparisons ([R, T], R = Σ sizes), best first within each comparison."""

    batch: Batch
    sizes: list[int]
    margins: torch.Tensor | None = None
    """[G] per-comparison margins (only when every comparison in the batch has one)"""
    ref_logps: torch.Tensor | None = None
    """[R] reference log-probs of every row, when precomputed"""
    origins: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def n_comparisons(self) -> int:
        return len(self.sizes)

    def to(self, device: torch.device | str) -> "ComparisonBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ComparisonBatch(self.batch.to(device), self.sizes, move(self.margins), move(self.ref_logps), self.origins)

    def pair_indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row indices (better, worse) of every ordered pair, and the comparison each pair belongs to."""
        better, worse, group = [], [], []
        offset = 0
        for g, size in enumerate(self.sizes):
            for i in range(size):
                for j in range(i + 1, size):
                    better.append(offset + i)
                    worse.append(offset + j)
                    group.append(g)
            offset += size
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.batch.input_ids.device)  # noqa: E731
        return as_tensor(better), as_tensor(worse), as_tensor(group)


def encode_comparisons(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[PreferencePair | Ranking], max_length: int
) -> tuple[list[Comparison], TruncationReport]:
    """Tokenise every response with the chat template; a comparison with a response cut to nothing is dropped."""
    report = TruncationReport(max_length)
    comparisons = []
    for record in records:
        texts = [record.chosen, record.rejected] if isinstance(record, PreferencePair) else list(record.responses)
        encoded = [encode_prompt_completion(tokenizer, record.prompt, text, origin=record.origin) for text in texts]
        kept = truncate_together(encoded, report, record.origin)
        if kept is None:
            continue
        margin = record.margin if isinstance(record, PreferencePair) else None
        comparisons.append(Comparison(kept, margin, record.origin))
    return comparisons, report


def collate_comparisons(comparisons: Sequence[Comparison], pad_id: int, pack_to: int = 0, share_prompts: bool = False) -> ComparisonBatch:
    """One row per response, right-padded; with `pack_to` > 0 the responses are laid end to end in rows of at
    most that many tokens instead (`collate_packed`: read them back with `ends` or `example_sums`), and with
    `share_prompts` too, a comparison's prompt goes in once for all its responses (`collate_packed_shared`)."""
    rows = [[response] for c in comparisons for response in c.responses]
    margins = None
    if all(c.margin is not None for c in comparisons):
        margins = torch.tensor([c.margin for c in comparisons], dtype=torch.float32)
    ref = None
    if all(c.ref_logps is not None for c in comparisons):
        ref = torch.tensor([lp for c in comparisons for lp in c.ref_logps], dtype=torch.float32)  # type: ignore[union-attr]
    if pack_to and share_prompts:
        batch = collate_packed_shared([c.responses for c in comparisons], pack_to, pad_id)
    elif pack_to:
        batch = collate_packed([row[0] for row in rows], pack_to, pad_id)
    else:
        batch = collate(rows, pad_id)
    return ComparisonBatch(batch, [len(c.responses) for c in comparisons], margins, ref, [c.origin for c in comparisons])
