"""Greedy generation on the built-in model: fixed batches against continuous batching, in one process.

    .venv/bin/python bench/generation.py [--prompts 48] [--max-new-tokens 256] [--batch-size 16] [--reps 1] [--threads N]

SmolLM2-135M-Instruct, fp32, on the first `--prompts` prompts of IFEval (`src/alignkit/resources/ifeval_541.jsonl`),
greedy, one completion per prompt. `fixed`: `TransformersGenerator(refill=False)`, batches of `--batch-size`
prompts (longest first), each decoded until its longest answer ends, rows leaving as they finish. `continuous`:
the default, where waiting prompts join as rows finish. One small warm-up call runs first (lazy initialisation),
then the two modes in turn (fixed, continuous, fixed, ... for `--reps` rounds) on the same loaded model, so both
see the same weights, threads and machine, and a change in the machine's load touches both alike.

Reported per mode and round: completion tokens (stop tokens not counted) per second of wall time, the wall time,
the share of answers cut at `--max-new-tokens`, the decoding steps and their mean rows (how full the batch ran,
which the machine's load does not change); then the median wall time of each mode and whether every run gave
the same greedy texts. The machine's load average is printed before and after: another process on a shared CPU
slows whichever mode runs beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from alignkit.data.loading import load_records
from alignkit.generation import Sample, SamplingParams, TransformersGenerator
from alignkit.models import SMOLLM2, load_model, load_tokenizer

PROMPTS = Path(__file__).resolve().parents[1] / "src" / "alignkit" / "resources" / "ifeval_541.jsonl"


def timed(generator: TransformersGenerator, prompts: list, params: SamplingParams) -> tuple[list[Sample], float, list[int]]:
    """The samples, the wall time, and the rows of each decoding step (a forward pass of one token per row)."""
    rows: list[int] = []

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs["input_ids"].shape[1] == 1:
            rows.append(kwargs["input_ids"].shape[0])

    hook = generator.model.register_forward_pre_hook(count, with_kwargs=True)
    started = time.perf_counter()
    samples = generator.generate(prompts, params)
    wall = time.perf_counter() - started
    hook.remove()
    return samples, wall, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48, help="how many IFEval prompts (the first N)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=1, help="rounds of (fixed, continuous)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores); "
                        "on a CPU that other processes share, fewer threads than cores avoid waiting on a busy one")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    records, _ = load_records(str(PROMPTS), "prompt", limit=args.prompts)
    prompts = [r.prompt for r in records]
    model, tokenizer = load_model(SMOLLM2), load_tokenizer(SMOLLM2)
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    TransformersGenerator(model, tokenizer, batch_size=2).generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=4))

    texts, walls = set(), {"fixed": [], "continuous": []}
    print(f"{args.prompts} prompts, max {args.max_new_tokens} new tokens, batch {args.batch_size}, greedy")
    print(f"{'mode':<11} {'tokens':>7} {'wall s':>8} {'tokens/s':>9} {'cut':>6} {'steps':>6} {'rows/step':>9}")
    for _ in range(args.reps):
        for mode, refill in (("fixed", False), ("continuous", True)):
            generator = TransformersGenerator(model, tokenizer, batch_size=args.batch_size, refill=refill)
            samples, wall, rows = timed(generator, prompts, params)
            completions = [s.completions[0] for s in samples]
            tokens = sum(len(c.token_ids) for c in completions)
            cut = sum(not c.finished for c in completions) / len(completions)
            texts.add(tuple(c.text for c in completions))
            walls[mode].append(wall)
            print(f"{mode:<11} {tokens:>7} {wall:>8.1f} {tokens / wall:>9.1f} {cut:>6.1%} {len(rows):>6} "
                  f"{sum(rows) / len(rows):>9.1f}")
    fixed, continuous = statistics.median(walls["fixed"]), statistics.median(walls["continuous"])
    print(f"median wall: fixed {fixed:.1f} s, continuous {continuous:.1f} s ({fixed / continuous:.2f}x)")
    print(f"greedy texts identical in every run: {len(texts) == 1}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
