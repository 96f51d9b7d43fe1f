"""Reference-model log-probabilities, computed once before training and cached on disk.

DPO-style losses compare the policy with a frozen reference. When the reference is the starting policy (the
usual case: the SFT model), its log-probs on the training data never change, so one forward pass over the
data the run will train on, before training, replaces a second model in memory and a second forward pass per
step. The cache is keyed by the model, the tokenised data and the length limit; a cache made for anything
else is refused.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
from collections.abc import Collection, Iterator
from pathlib import Path

import torch

from alignkit.data.tokenize import Batch, Example, collate
from alignkit.errors import AlignkitError
from alignkit.logprobs import TokenLogprobModel, batch_logprobs
from alignkit.models import evaluating, model_fingerprint, resolve


@torch.no_grad()
def sequence_logprobs(model: TokenLogprobModel, examples: list[Example], pad_id: int, batch_size: int = 8) -> list[float]:
    """Summed target log-probs of each example, batched by similar length to waste little on padding."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    result = [0.0] * len(examples)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([[examples[i]] for i in chunk], pad_id).to(device)
            for i, value in zip(chunk, batch_logprobs(model, batch).sum(-1).tolist()):
                result[i] = value
    return result


def data_fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(len(example).to_bytes(4, "little"))
        digest.update(torch.tensor(example.input_ids, dtype=torch.int32).numpy().tobytes())
        digest.update(torch.tensor(example.labels, dtype=torch.int32).numpy().tobytes())
    return digest.hexdigest()


def model_identity(name: str) -> dict[str, object]:
    """The model's config summary plus size and time of its weight files: changes when the weights do."""
    directory = Path(resolve(name))
    weights = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    return {**model_fingerprint(name), "weights": [(w.name, w.stat().st_size, int(w.stat().st_mtime)) for w in weights]}


def reference_cache(output: Path, given: str, overwrite: bool) -> Path:
    """Where a run caches its reference log-probs: `given` (--reference-cache), or OUTPUT/reference_logps.pt.

    Starting afresh in OUTPUT (--overwrite) discards the cache made there for the old run's data, and its held-out
    twin; a --reference-cache of the user's own is theirs to keep (one made for other data is refused, never
    overwritten).
    """
    if given:
        return Path(given)
    cache = output / "reference_logps.pt"
    if overwrite:
        for stale in (cache, held_out_cache(cache)):
            stale.unlink(missing_ok=True)
    return cache


def held_out_cache(cache: Path) -> Path:
    """The cache of the held-out examples' reference log-probs, beside the training one."""
    return cache.with_name(cache.stem + ".eval.pt")


def cached_reference_logprobs(
    model: TokenLogprobModel,
    model_name: str,
    examples: list[Example],
    pad_id: int,
    cache: Path,
    batch_size: int = 8,
    needed: Collection[int] | None = None,
) -> list[float]:
    """Reference log-probs of `examples`, read from `cache` when it was made for this model and data.

    Only the `needed` examples (default: all) are computed, the others are NaN: a run of a few steps over a
    large set scores just the pairs it will train on. A later run that needs more computes only the missing
    ones and adds them to the cache.
    """
    key = {"model": model_identity(model_name), "data": data_fingerprint(examples), "n": len(examples)}
    logps = [math.nan] * len(examples)
    if cache.exists():
        try:
            stored = torch.load(cache, weights_only=True)
        except Exception as exc:  # a truncated or foreign file
            raise AlignkitError(f"cannot read the reference cache ({exc})", where=str(cache), fix="delete it to recompute") from None
        if stored.get("key") != key:
            made_for = stored.get("key", {})
            what = "model" if made_for.get("model") != key["model"] else "data"
            raise AlignkitError(
                f"the reference cache was made for another {what} ({made_for.get('model', {}).get('name', '?')}, "
                f"{made_for.get('n', '?')} sequences) than this run ({model_name}, {len(examples)} sequences)",
                where=str(cache),
                fix="delete the file to recompute it, or give --reference-cache a new path",
            )
        logps = stored["logps"]
    missing = [i for i in (range(len(examples)) if needed is None else sorted(needed)) if math.isnan(logps[i])]
    if missing:
        for i, value in zip(missing, sequence_logprobs(model, [examples[i] for i in missing], pad_id, batch_size)):
            logps[i] = value
        cache.parent.mkdir(parents=True, exist_ok=True)
        # One temporary name per process: runs in other output directories may share a --reference-cache.
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            torch.save({"key": key, "logps": logps}, tmp)
            os.replace(tmp, cache)
        finally:
            tmp.unlink(missing_ok=True)
    return logps


def item_reference_logprobs(
    model: TokenLogprobModel, model_name: str, sequences: list[Example], owned: list[list[int]], pad_id: int, cache: Path,
    batch_size: int = 8, needed: Collection[int] | None = None,
) -> list[list[float]]:  # fmt: skip
    """Reference log-probs of each item's sequences (item i owns `sequences[j]` for j in `owned[i]`), through
    `cache`, computed for the `needed` items only (default: all); NaN for the others'.

    `sequences` is laid out as the cache stores it (its fingerprint depends on the order), so each algorithm
    keeps its own layout: a comparison's responses one after another (DPO), every matched sequence then every
    mismatched one (KTO).
    """
    needed_sequences = None if needed is None else [j for i in needed for j in owned[i]]
    logps = cached_reference_logprobs(model, model_name, sequences, pad_id, cache, batch_size, needed_sequences)
    return [[logps[j] for j in indices] for indices in owned]


def policy_reference(policy: TokenLogprobModel) -> TokenLogprobModel:
    """The reference for online RL: the policy itself when it has a LoRA adapter (the base under the adapter
    is the reference, so no copy is made), else a frozen copy of the starting model."""
    if hasattr(policy.model, "disable_adapter"):
        return policy
    return TokenLogprobModel(copy.deepcopy(policy.model)).requires_grad_(False).eval()


@contextlib.contextmanager
def as_reference(reference: TokenLogprobModel) -> Iterator[None]:
    """Inside it, `reference` computes the reference's log-probs: the LoRA policy with its adapter switched off."""
    if hasattr(reference.model, "disable_adapter"):
        with reference.model.disable_adapter():
            yield
    else:
        yield


def reference_logps(reference: TokenLogprobModel, batch: Batch) -> torch.Tensor:
    """Target log-probs under the reference: with the adapter switched off when it is the LoRA policy."""
    with torch.no_grad(), as_reference(reference):
        return batch_logprobs(reference, batch)
