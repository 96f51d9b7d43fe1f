"""From records to token tensors: chat template, completion-only labels, truncation report, packing.

Labels are found on the rendered text, not guessed from token counts: each assistant turn's character span
is located by rendering the conversation up to that turn, and a token is trained on when its characters lie
in such a span. This holds for any chat template that renders a conversation as a growing prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from alignkit.data.records import Conversation, Message, Prompt
from alignkit.errors import DataError

IGNORE = -100


@dataclass
class Example:
    """One tokenised sequence; `labels[i]` is the target for position i (IGNORE where not trained)."""

    input_ids: list[int]
    labels: list[int]
    origin: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class TruncationReport:
    """How many examples the length limit cut or dropped, and how many tokens were lost."""

    max_length: int
    examples: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    dropped: int = 0
    dropped_origins: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.examples} examples, {self.truncated} truncated to {self.max_length} tokens ({self.tokens_cut} tokens cut)"
        if self.dropped:
            text += f", {self.dropped} dropped (no response token left, e.g. {self.dropped_origins[0]})"
        return text


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Prompt, *, last_only: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns to train on.

    A span covers the reply and the end-of-turn marker the template puts after it (so the model learns to
    stop), but not whitespace the template adds after that marker.
    """
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    indices = [i for i, m in enumerate(messages) if m.role == "assistant"]
    for i in indices[-1:] if last_only else indices:
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not text.startswith(before) or not text.startswith(upto):
            raise ValueError("the chat template does not render the conversation as a growing prefix")
        spans.append((len(before), len(before) + len(upto[len(before) :].rstrip())))
    return text, spans


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Prompt, *, last_only: bool = False, origin: str = ""
) -> Example:
    """Tokenise a conversation with the model's chat template; only assistant tokens get labels."""
    text, spans = assistant_spans(tokenizer, messages, last_only=last_only)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE] * len(encoded["input_ids"])
    for position, ((start, end), token) in enumerate(zip(encoded["offset_mapping"], encoded["input_ids"])):
        if end > start and any(lo <= start < hi for lo, hi in spans):
            labels[position] = token
    # Position i predicts token i + 1: shift once here so losses can compare logits[i] with labels[i].
    return Example(encoded["input_ids"], labels[1:] + [IGNORE], origin)


def encode_conversations(tokenizer: PreTrainedTokenizerBase, records: list[Conversation], *, last_only: bool) -> list[Example]:
    """`encode_conversation` of each record; a chat template that refuses one names its file and line."""
    examples = []
    for record in records:
        try:
            examples.append(encode_conversation(tokenizer, record.messages, last_only=last_only, origin=record.origin))
        except ValueError as exc:  # e.g. a template that rejects this role order
            path, _, line = record.origin.rpartition(":")
            raise DataError(f"cannot apply the chat template: {exc}", path=path, line=int(line)) from None
    return examples


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str, *, origin: str = ""
) -> Example:
    """A prompt and one assistant reply, trained on the reply only (used by SFT, reward models, DPO)."""
    return encode_conversation(tokenizer, prompt + (Message("assistant", completion),), last_only=True, origin=origin)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, *, origin: str = "") -> Example:
    """Plain text for language modelling: every token is a target, an end-of-text token closes it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(ids, ids[1:] + [IGNORE], origin)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of a prompt ready for the assistant to answer (generation prompt appended)."""
    return tokenizer(_render(tokenizer, prompt, generation_prompt=True), add_special_tokens=False)["input_ids"]


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts [B, T] left-padded to the longest, their attention mask and their position ids.

    Left padding puts every prompt's last token in the last column, where generation continues and where a
    judge reads its answer. Positions count real tokens only, as in training (rows right-padded from
    position 0), so a padded prompt is read exactly as it would be alone.
    """
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    return input_ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)


def truncate(examples: list[Example], max_length: int) -> tuple[list[Example], TruncationReport]:
    """Cut examples to `max_length` tokens from the right; drop those left with nothing to learn."""
    report = TruncationReport(max_length, examples=len(examples))
    kept = []
    for example in examples:
        if len(example) > max_length:
            report.truncated += 1
            report.tokens_cut += len(example) - max_length
            # The last kept position has no next token inside the window, so it predicts nothing.
            example = Example(example.input_ids[:max_length], example.labels[: max_length - 1] + [IGNORE], example.origin)
        if example.n_targets == 0:
            report.dropped += 1
            report.dropped_origins.append(example.origin)
            continue
        kept.append(example)
    return kept, report


def truncate_together(examples: list[Example], report: TruncationReport, origin: str) -> list[Example] | None:
    """Truncate examples that only make sense together (a pair, a ranking); None if any is left empty.

    The cuts are added to `report`, and a dropped group counts once.
    """
    kept, cut = truncate(examples, report.max_length)
    report.examples += cut.examples
    report.truncated += cut.truncated
    report.tokens_cut += cut.tokens_cut
    if len(kept) < len(examples):
        report.dropped += 1
        report.dropped_origins.append(origin)
        return None
    return kept


def pack(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Group examples into rows of at most `max_length` tokens (first fit, in the given order).

    Rows are collated with position ids that restart for each example; `transformers` turns those into a
    block-diagonal causal mask, so one example never attends to another.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in examples:
        for i, free in enumerate(room):
            if len(example) <= free:
                rows[i].append(example)
                room[i] -= len(example)
                break
        else:
            rows.append([example])
            room.append(max_length - len(example))
    return rows


@dataclass
class Batch:
    """Token tensors of one micro-batch, all [B, T].

    `attention_mask` is None for packed rows: the restarting `position_ids` carry the example boundaries.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    n_tokens: int
    """Real (non-padding) tokens, the unit of throughput."""
    ends: torch.Tensor | None = None
    """[N] flat index (row · T + column) of each example's last token, in the order the examples were given
    (`collate_packed`): where a per-sequence output (a reward) is read once packing has moved the examples."""
    example_index: torch.Tensor | None = None
    """[B, T] which example (in the order given to `collate_packed`) each position belongs to, −1 for padding"""
    prefix: "Batch | None" = None
    """[G, P] tokens shared by groups of B / G consecutive rows (`collate_with_prefixes`): each runs once and
    its KV cache is repeated for the rows that continue it; `attention_mask` then spans prefix and row, [B, P + T]"""

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.position_ids.to(device),
            move(self.attention_mask),
            self.n_tokens,
            move(self.ends),
            move(self.example_index),
            move(self.prefix),
        )

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def example_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Σ of `values` [B, T] over each example's positions: [B] for one example a row, else [N] in the
        order the examples were given to `collate_packed`."""
        if self.example_index is None:
            return values.sum(-1)
        mine = self.example_index >= 0
        return values.new_zeros(len(self.ends)).index_add(0, self.example_index[mine], values[mine])

    def select(self, rows: slice | torch.Tensor) -> "Batch":
        """Some rows of a right-padded batch (a slice or indices), without the padding columns none of them needs."""
        if self.attention_mask is None or self.ends is not None or self.prefix is not None:
            raise ValueError("only a right-padded batch (not a packed one) can be cut into rows")
        mask = self.attention_mask[rows]
        width = int(mask.sum(-1).max())
        return Batch(
            self.input_ids[rows][:, :width],
            self.labels[rows][:, :width],
            self.position_ids[rows][:, :width],
            mask[:, :width],
            int(mask.sum()),
        )


def collate(rows: Sequence[Sequence[Example]], pad_id: int) -> Batch:
    """Right-pad rows to the longest; a row of several examples is packed (restarting positions, no mask)."""
    packed = any(len(row) > 1 for row in rows)
    width = max(sum(len(e) for e in row) for row in rows)
    input_ids, labels, positions, masks = [], [], [], []
    real_tokens = 0
    for row in rows:
        ids = [t for e in row for t in e.input_ids]
        lab = [t for e in row for t in e.labels]
        pos = [p for e in row for p in range(len(e))]
        pad = width - len(ids)
        real_tokens += len(ids)
        input_ids.append(ids + [pad_id] * pad)
        labels.append(lab + [IGNORE] * pad)
        # Padding gets its own restarting positions, so in a packed row it forms a separate block.
        positions.append(pos + list(range(pad)))
        masks.append([1] * len(ids) + [0] * pad)
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731  (long even when rows are empty)
    return Batch(
        as_tensor(input_ids),
        as_tensor(labels),
        as_tensor(positions),
        None if packed else as_tensor(masks),
        real_tokens,
    )


def collate_with_prefixes(prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Sequences `prefix + continuation` scored on their continuations, each prefix computed once.

    The i-th prefix is shared by the i-th group of len(continuations) / len(prefixes) consecutive
    continuations (the K samples of a prompt). All but a prefix's last token go in `Batch.prefix`; a row is
    that last token followed by its continuation without the continuation's own last token, so position t of
    a row predicts continuation token t, and a row has exactly as many positions as targets. The model runs
    the prefixes once and their KV cache serves all K rows, instead of computing each prompt K times.
    `n_tokens` still counts every row's whole sequence, prefix included: the same unit of throughput as
    `collate` of the full rows, whose log-probs these are.
    """
    if not prefixes or len(continuations) % len(prefixes):
        raise ValueError(f"{len(continuations)} continuations cannot be split evenly among {len(prefixes)} prefixes")
    k = len(continuations) // len(prefixes)
    if any(not p for p in prefixes):
        raise ValueError("a shared prefix needs at least one token")
    shared = collate([[Example(list(p[:-1]), [IGNORE] * (len(p) - 1))] for p in prefixes], pad_id)
    rows, offsets = [], []
    for i, continuation in enumerate(continuations):
        prefix = prefixes[i // k]
        ids = ([prefix[-1]] + list(continuation))[: max(len(continuation), 1)]
        rows.append([Example(ids, list(continuation) + [IGNORE] * (len(ids) - len(continuation)))])
        offsets.append(len(prefix) - 1)
    batch = collate(rows, pad_id)
    batch.position_ids = batch.position_ids + torch.tensor(offsets)[:, None]
    assert shared.attention_mask is not None and batch.attention_mask is not None
    batch.attention_mask = torch.cat([shared.attention_mask.repeat_interleave(k, dim=0), batch.attention_mask], dim=-1)
    batch.n_tokens = sum(len(prefixes[i // k]) + len(c) for i, c in enumerate(continuations))
    batch.prefix = shared
    return batch


def shared_prompt_length(examples: Sequence[Example]) -> int:
    """How many leading tokens `examples` hold alike and none of them trains on (their common prompt), leaving
    each at least one token of its own."""
    limit = min(len(e) for e in examples) - 1
    first = examples[0]
    for i in range(limit):
        if any(e.input_ids[i] != first.input_ids[i] or e.labels[i] != IGNORE for e in examples):
            return i
    return max(limit, 0)


def collate_packed_shared(groups: Sequence[Sequence[Example]], max_length: int, pad_id: int) -> Batch:
    """`collate_packed` for groups of examples that share a prompt (the responses of a comparison): the prompt
    goes in once, followed by each example's own tokens, and a [B, 1, T, T] boolean mask lets an example's
    tokens see its prompt and themselves but not the other examples of its group, nor other groups.

    An example's own tokens keep their positions (they continue the prompt), so each scores as it would alone,
    for one prompt's work instead of K. `ends` and `example_index` follow the examples in the order of the
    flattened groups; the shared prompt belongs to none of them (−1) and carries no labels. `n_tokens` counts
    every example's whole sequence, as `collate_packed` does.
    """
    units: list[Example] = []
    layouts: list[tuple[list[int], list[int], list[int]]] = []  # per unit: positions, branches, example numbers
    number = 0
    for group in groups:
        shared = shared_prompt_length(group) if len(group) > 1 else 0
        ids, labels = list(group[0].input_ids[:shared]), [IGNORE] * shared
        positions, branches, numbers = list(range(shared)), [0] * shared, [-1] * shared
        for branch, example in enumerate(group, start=1):
            own = len(example) - shared
            ids += example.input_ids[shared:]
            labels += example.labels[shared:]
            positions += range(shared, len(example))
            branches += [branch] * own
            numbers += [number] * own
            number += 1
        units.append(Example(ids, labels))
        layouts.append((positions, branches, numbers))
    slot = {id(unit): u for u, unit in enumerate(units)}
    # A group longer than `max_length` sets the width of the batch: every row may then fill up to it.
    rows = pack(sorted(units, key=len, reverse=True), max(max_length, max(map(len, units))))
    width = max(sum(len(unit) for unit in row) for row in rows)
    shape = (len(rows), width)
    input_ids, labels_t = torch.full(shape, pad_id, dtype=torch.long), torch.full(shape, IGNORE, dtype=torch.long)
    positions_t, branch_t = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    index = torch.full(shape, -1, dtype=torch.long)
    segment = -1 - torch.arange(len(rows) * width).view(shape)  # each padding position is a segment of its own
    for r, row in enumerate(rows):
        start = 0
        for unit in row:
            u = slot[id(unit)]
            columns = slice(start, start + len(unit))
            positions, branches, numbers = layouts[u]
            input_ids[r, columns], labels_t[r, columns] = torch.tensor(unit.input_ids), torch.tensor(unit.labels)
            positions_t[r, columns], branch_t[r, columns] = torch.tensor(positions), torch.tensor(branches)
            index[r, columns], segment[r, columns] = torch.tensor(numbers), u
            start += len(unit)
    flat = index.flatten()
    ends = torch.zeros(number, dtype=torch.long).scatter_reduce(0, flat[flat >= 0], (flat >= 0).nonzero().squeeze(-1), "amax")
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_group = segment[:, :, None] == segment[:, None, :]
    own_or_shared = (branch_t[:, None, :] == 0) | (branch_t[:, :, None] == branch_t[:, None, :])
    mask = (causal & same_group & own_or_shared)[:, None]
    tokens = sum(len(e) for group in groups for e in group)
    return Batch(input_ids, labels_t, positions_t, mask, tokens, ends, index)


def collate_packed(examples: Sequence[Example], max_length: int, pad_id: int) -> Batch:
    """All `examples` packed into rows of at most `max_length` tokens and collated, with `ends` set.

    Longest first, so first fit leaves little room unused (first-fit decreasing). Keeping rows within
    `max_length` instead of one long row matters where attention is computed densely under a mask (sdpa or
    eager on CPU): its cost grows with the square of the row length.
    """
    rows = pack(sorted(examples, key=len, reverse=True), max_length)
    batch = collate(rows, pad_id)
    width = batch.input_ids.shape[1]
    # Examples are found again by identity; one given twice has two slots and identical content, so
    # which occurrence takes which slot does not matter.
    slots: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        end = r * width
        for example in row:
            end += len(example)
            slots.setdefault(id(example), []).append(end - 1)
    batch.ends = torch.tensor([slots[id(e)].pop() for e in examples], dtype=torch.long)
    index = torch.full((len(rows) * width,), -1, dtype=torch.long)
    for i, (end, example) in enumerate(zip(batch.ends.tolist(), examples)):
        index[end - len(example) + 1 : end + 1] = i
    batch.example_index = index.view(len(rows), width)
    return batch
