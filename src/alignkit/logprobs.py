"""Per-token log-probabilities of target tokens without the full [B, T, V] logits in memory.

With a 49k vocabulary the output head dominates activation memory at this model size: a batch of 8×512
tokens has 0.8 GB of fp32 logits, and autograd would keep them (and the log-softmax) for the backward pass.
Here only positions with a target are sent through the head, in chunks, each under activation
checkpointing: the forward keeps one log-prob per target, the backward recomputes one chunk's logits at a
time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from alignkit.data.tokenize import IGNORE, Batch, Example, collate, collate_packed, collate_packed_shared, collate_with_prefixes
from alignkit.models import evaluating, with_cache


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def target_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log softmax(hidden @ weightᵀ + bias)[target] for rows of `hidden` [N, H]; returns [N] in fp32."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_chunk_logprobs, h, weight, bias, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, weight, bias, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


# The attention implementations of `transformers` that take a custom [B, 1, T, T] mask (`attention_input`).
MASKABLE_ATTENTION = ("sdpa", "eager")


def attention_input(config: Any, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention mask as the model's attention takes it: a [B, 1, T, T] boolean mask (True: may attend,
    `collate_packed_shared`) goes to sdpa as it is and to eager attention as an additive one; others pass."""
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool or getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)


@torch.no_grad()
def keeps_packed_sequences_apart(owner: torch.nn.Module, body: Callable[..., Any], *, shared_prompts: bool = False) -> bool:
    """One tiny forward of the decoder `body` of `owner` (evaluated without dropout, its mode restored): is the
    last hidden state of each sequence packed in a row the same as alone?

    Packed with `collate_packed` (position ids restarting at 0, no attention mask), or with `shared_prompts`
    as `collate_packed_shared` lays out two pairs that each share their first tokens (a boolean mask; sdpa
    and eager attention only). `transformers` turns restarting position ids into a block-diagonal mask in its
    own attention implementations (eager, sdpa, flex; flash attention goes varlen), but a model that builds
    its own mask (remote code, an older version) would let each sequence attend to the ones before it in the
    row, silently. Leaking changes the state by O(1); the 5% tolerance only absorbs bf16 rounding.
    """
    config = getattr(body, "config", None)
    if shared_prompts and getattr(config, "_attn_implementation", None) not in MASKABLE_ATTENTION:
        return False
    pairs = [[[3, 5, 7, 9], [3, 5, 6]], [[4, 6, 8], [4, 6, 2, 7]]]
    groups = [[Example(ids, [IGNORE] * len(ids)) for ids in pair] for pair in pairs]
    examples = [e for group in groups for e in group]
    batch = collate_packed_shared(groups, 64, pad_id=0) if shared_prompts else collate_packed(examples, 64, pad_id=0)
    assert batch.ends is not None
    device = next(owner.parameters()).device
    batch = batch.to(device)
    with evaluating(owner):
        packed = body(
            input_ids=batch.input_ids, attention_mask=attention_input(config, batch.attention_mask),
            position_ids=batch.position_ids, use_cache=False,
        ).last_hidden_state.flatten(0, 1)[batch.ends].float()  # fmt: skip
        alone = [body(input_ids=torch.tensor([e.input_ids], device=device), use_cache=False).last_hidden_state[0, -1].float() for e in examples]
    return all(bool((mine - own).norm() <= 0.05 * own.norm()) for mine, own in zip(packed, alone))


class UnfilledCache(RuntimeError):
    """The decoder left the KV cache it was handed empty: rows cannot continue a prefix from it."""


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `transformers` model under a `peft` wrapper (LoRA layers stay injected inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TokenLogprobModel(torch.nn.Module):
    """Wraps a causal LM so that `forward(batch)` returns log p(labels[t] | tokens ≤ t), [B, T], 0 where IGNORE.

    This wrapper, not the inner model, is what `accelerate.prepare` wraps for DDP/FSDP, so gradient
    synchronisation sees the whole computation.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        config = base_model(model).config
        # Heads that rescale or soft-cap logits are not a plain linear layer; use the model's own forward.
        self.plain_head = not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))

    def keeps_packed_sequences_apart(self, *, shared_prompts: bool = False) -> bool:
        """Whether rows of several sequences (packed, padding-free; `shared_prompts`: a comparison's responses
        after one copy of their prompt) give each the log-probs it has alone."""
        return keeps_packed_sequences_apart(self, base_model(self.model).get_decoder(), shared_prompts=shared_prompts)

    @torch.no_grad()
    def shares_prefixes(self) -> bool:
        """Whether rows that continue a shared prefix from its KV cache (`collate_with_prefixes`) get the
        log-probs of their whole sequences.

        Not under gradient checkpointing, which drops the cache in training. Otherwise checked on a tiny
        example, as for packing: the last hidden state of each row must be that of its full sequence, or a
        model whose attention ignored the cache or the mask would score the continuations without their prompt.
        """
        if any(getattr(m, "gradient_checkpointing", False) for m in base_model(self.model).modules()):
            return False
        device = next(self.parameters()).device
        prefixes, continuations = [[3, 5, 7, 9], [4, 6]], [[8, 10], [6], [5, 7, 9], [11, 3]]
        owner = [prefixes[i // 2] for i in range(len(continuations))]
        shared = collate_with_prefixes(prefixes, continuations, pad_id=0).to(device)
        assert shared.prefix is not None
        full = collate([[Example(p + c, [IGNORE] * len(p + c))] for p, c in zip(owner, continuations)], pad_id=0).to(device)
        try:
            with evaluating(self):
                _, shared_hidden = self.logprobs_and_hidden(
                    shared.input_ids, shared.labels, shared.position_ids, shared.attention_mask,
                    shared.prefix.input_ids, shared.prefix.position_ids, shared.prefix.attention_mask,
                )  # fmt: skip
                _, full_hidden = self.logprobs_and_hidden(full.input_ids, full.labels, full.position_ids, full.attention_mask)
        except UnfilledCache:
            return False
        for i, (p, c) in enumerate(zip(owner, continuations)):
            mine, alone = shared_hidden[i, len(c) - 1].float(), full_hidden[i, len(p) + len(c) - 2].float()
            if (mine - alone).norm() > 0.05 * alone.norm():  # the tolerance only absorbs bf16 rounding
                return False
        return True

    def forward(self, *tensors: torch.Tensor | None) -> torch.Tensor:
        """Target log-probs [B, T]; takes the tensors of `logprobs_and_hidden`, in its order."""
        return self.logprobs_and_hidden(*tensors)[0]  # type: ignore[arg-type]

    def prefix_cache(self, prefix_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, rows: int) -> DynamicCache | None:
        """The KV cache of prefixes [G, P], each repeated for its rows / G rows (gradients flow back through it)."""
        if prefix_ids.shape[1] == 0:
            return None
        decoder = base_model(self.model).get_decoder()
        cache = DynamicCache(config=base_model(self.model).config)
        decoder(input_ids=prefix_ids, attention_mask=attention_mask, position_ids=position_ids, **with_cache(decoder, cache), use_cache=True)
        if cache.get_seq_length() != prefix_ids.shape[1]:
            raise UnfilledCache("the model did not fill the prefix's KV cache (gradient checkpointing?): score full rows instead")
        cache.batch_repeat_interleave(rows // prefix_ids.shape[0])
        return cache

    def logprobs_and_hidden(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prefix_ids: torch.Tensor | None = None,
        prefix_position_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target log-probs [B, T] and the final hidden states [B, T, H] (for a value head on the policy).

        With `prefix_ids` [G, P] (and its positions and mask), the rows continue those prefixes, B / G rows
        each, and `attention_mask` spans prefix and row, [B, P + T] (`collate_with_prefixes`).
        """
        base = base_model(self.model)
        mask = labels != IGNORE
        targets = labels[mask]
        out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        cache = None
        if prefix_ids is not None:
            assert prefix_position_ids is not None and prefix_mask is not None
            cache = self.prefix_cache(prefix_ids, prefix_position_ids, prefix_mask, input_ids.shape[0])
        attention = attention_input(base.config, attention_mask)
        inputs = dict(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=cache is not None)
        if self.plain_head:
            decoder = base.get_decoder()
            hidden = decoder(**inputs, **with_cache(decoder, cache)).last_hidden_state
            head = base.get_output_embeddings()
            logps = target_logprobs(hidden[mask], head.weight, head.bias, targets, self.chunk_size)
        else:
            outputs = base(**inputs, **with_cache(base, cache), output_hidden_states=True)
            hidden = outputs.hidden_states[-1]
            logps = outputs.logits[mask].float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        out[mask] = logps
        return out, hidden


def batch_logprobs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Call a (possibly DDP-wrapped) `TokenLogprobModel` on a batch: [B, T] target log-probs."""
    prefix = batch.prefix
    if prefix is None:
        return model(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask)
    return model(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask,
                 prefix.input_ids, prefix.position_ids, prefix.attention_mask)  # fmt: skip


@torch.no_grad()
def mean_nll(model: TokenLogprobModel, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Average negative log-likelihood per response token over `examples`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            batch = collate([[e] for e in examples[start : start + batch_size]], pad_id).to(device)
            total -= batch_logprobs(model, batch).sum().item()
            count += batch.n_targets
    return total / max(count, 1)
