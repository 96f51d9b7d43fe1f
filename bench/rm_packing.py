"""Reward-model forward + backward on the built-in model, padded rows against packed rows.

    .venv/bin/python bench/rm_packing.py [--reps 3] [--batches 2]

SmolLM2-135M-Instruct with LoRA r 16 (α 32, all linear layers) and a fresh reward head, micro-batches of
8 pairs of `src/alignkit/resources/prefs_alpacaeval_train.jsonl` cut at 256 tokens, fp32, one thread.
Padded: one right-padded row per answer (`--no-packing`); packed: the answers of a micro-batch in rows of
at most 256 tokens (the default). Each (mode, repetition) runs in a fresh process, so its peak RSS
(`ru_maxrss`) is its own, and the modes alternate (padded, packed, padded, ...) so changes in the load of
a shared machine touch both alike. Timed: `--batches` micro-batches after one small warm-up step.
tokens/s counts real (non-padding) tokens, the same for both modes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "alignkit" / "resources" / "prefs_alpacaeval_train.jsonl"
PAIRS, MAX_LENGTH = 8, 256


def run_one(mode: str, batches: int) -> dict:
    import torch

    from alignkit.algorithms.rm import RMLoss, collate_for_rm, encode_for
    from alignkit.data.loading import load_records
    from alignkit.models import SMOLLM2, LoraSettings
    from alignkit.rewards.reward_model import build_reward_model

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same head in both modes, so the losses must agree
    model = build_reward_model(
        SMOLLM2, lora=LoraSettings(r=16, alpha=32), max_length=MAX_LENGTH, packing=mode == "packed"
    ).train()
    assert model.packs() == (mode == "packed")
    records, _ = load_records(str(DATA), "comparison")
    comparisons, _ = encode_for(model, records, MAX_LENGTH)
    pad_id = model.tokenizer.pad_token_id
    pack_to = MAX_LENGTH if mode == "packed" else 0

    def step(chunk) -> tuple[int, int, float]:
        batch = collate_for_rm(chunk, pad_id, True, pack_to)
        loss, _ = RMLoss()(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return batch.n_tokens, batch.batch.input_ids.numel(), loss.item()

    step(comparisons[:1])  # first-call allocations and lazy initialisation, not timed
    tokens = positions = 0
    losses = []
    started = time.perf_counter()
    for b in range(batches):
        n, p, loss = step(comparisons[b * PAIRS : (b + 1) * PAIRS])
        tokens, positions = tokens + n, positions + p
        losses.append(round(loss, 5))
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    return {"mode": mode, "seconds": seconds, "tokens": tokens, "positions": positions, "losses": losses, "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2, help="timed micro-batches of 8 pairs per run")
    parser.add_argument("--child", choices=["padded", "packed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.batches)))
        return

    runs: dict[str, list[dict]] = {"padded": [], "packed": []}
    for rep in range(args.reps):
        for mode in runs:
            command = [sys.executable, __file__, "--child", mode, "--batches", str(args.batches)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            run["tokens_per_s"] = run["tokens"] / run["seconds"]
            runs[mode].append(run)
            print(
                f"rep {rep} {mode:6}: {run['tokens_per_s']:6.1f} tokens/s ({run['tokens']} tokens in "
                f"{run['positions']} positions, {run['seconds']:.1f} s), peak RSS {run['peak_mib']:.0f} MiB, "
                f"losses {run['losses']}",
                flush=True,
            )
    median = lambda mode, key: statistics.median(r[key] for r in runs[mode])  # noqa: E731
    paired = statistics.median(k["tokens_per_s"] / p["tokens_per_s"] for p, k in zip(runs["padded"], runs["packed"]))
    print(
        f"median tokens/s: padded {median('padded', 'tokens_per_s'):.1f}, packed {median('packed', 'tokens_per_s'):.1f} "
        f"(paired ratio packed/padded {paired:.2f}x); median peak RSS: padded {median('padded', 'peak_mib'):.0f} MiB, "
        f"packed {median('packed', 'peak_mib'):.0f} MiB; computed positions per run: padded "
        f"{runs['padded'][0]['positions']}, packed {runs['packed'][0]['positions']} for {runs['padded'][0]['tokens']} real tokens"
    )


if __name__ == "__main__":
    main()
