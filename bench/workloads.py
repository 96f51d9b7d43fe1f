"""The benchmark's workloads: one set of settings per workload, shared by the alignkit and the TRL side.

Both sides read the same records (the first `records` of the file), tokenise them with alignkit's own
functions (chat template, completion-only labels, truncation), and consume them in the same order: the
order of alignkit's data stream (a seeded permutation), which the TRL side reproduces with a sequential
sampler. So both train on the same tokens, in the same batches, from the same weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from alignkit.data.builtin import BUILTIN

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Workload:
    name: str
    kind: str
    """sft, rm, dpo or grpo"""
    data: str
    max_length: int
    batch_size: int
    """examples (SFT), pairs (RM, DPO) or prompts (GRPO) per micro-batch"""
    lr: float
    steps: int
    """timed optimiser steps; one more warm-up step runs first and is not timed"""
    grad_accum: int = 1
    lora_r: int = 0
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    beta: float = 0.1
    num_generations: int = 4
    max_new_tokens: int = 128
    seed: int = 42
    model: str = "smollm2-135m-instruct"
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.steps + 1

    @property
    def consumed(self) -> int:
        """Items (examples, pairs, prompts) the run consumes: one pass, no epoch boundary."""
        return self.total_steps * self.batch_size * self.grad_accum

    @property
    def records(self) -> int:
        """Records read: half again what is consumed, so that items dropped by truncation never leave too few."""
        return self.consumed * 3 // 2 + 4

    def to_json(self) -> dict:
        return asdict(self)


def workloads(steps: int | None = None) -> dict[str, Workload]:
    """The workloads, with `steps` timed steps each when given (else each one's default)."""
    # Built-in datasets, so that `make bench` runs in any clone (the files as shipped, read by path by both sides).
    prefs = str(BUILTIN["hh-helpful"].path)
    table = {
        "sft": Workload("sft", "sft", str(BUILTIN["sft-instructions"].path), 256, 4, 2e-5, 3),
        "rm": Workload("rm", "rm", prefs, 256, 4, 1e-4, 3, lora_r=16),
        "dpo": Workload("dpo", "dpo", prefs, 256, 4, 5e-6, 3),
        "dpo-lora": Workload("dpo-lora", "dpo", prefs, 256, 4, 5e-5, 3, lora_r=16),
        "grpo": Workload("grpo", "grpo", str(BUILTIN["gsm8k-train"].path), 256, 2, 1e-6, 2, beta=0.04,
                         max_new_tokens=64),
    }
    if steps:
        for w in table.values():
            w.steps = steps
    return table


DEFAULT = ["sft", "rm", "dpo", "grpo"]
