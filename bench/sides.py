"""One benchmark run in this process: `python bench/sides.py WORKLOAD SIDE --out FILE.json [--steps N]`.

Each (workload, side, repetition) runs in a fresh process, so the peak resident memory (ru_maxrss) is the
run's own. The first optimiser step is a warm-up and is not timed; throughput is measured from the end of
step 1 to the end of the last step.

Tokens are counted the same way on both sides: the real (non-padding) tokens of the sequences the timed
steps consumed, as alignkit tokenised them (prompt + response; chosen + rejected for DPO and RM; prompt +
completion of every sampled sequence for GRPO). Both sides consume the same sequences in the same order,
so for SFT, RM and DPO this is one number computed from the data; for GRPO, whose completions are sampled,
each side counts its own rows (its attention mask).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from workloads import Workload, workloads  # noqa: E402

HEAD_SEED, LORA_SEED = 1234, 4321


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- data, identical for both sides -------------------------------------------------------------------------


def alignkit_order(n: int, seed: int) -> list[int]:
    """The order in which alignkit's `Shuffled` stream serves n items in its first epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def sft_examples(w: Workload, tokenizer):
    from alignkit.algorithms.sft import encode_conversations
    from alignkit.data.loading import load_records
    from alignkit.data.tokenize import truncate

    records, _ = load_records(w.data, "conversation", limit=w.records)
    examples, _ = truncate(encode_conversations(tokenizer, records, last_only=False), w.max_length)
    return examples


def comparisons(w: Workload, tokenizer):
    from alignkit.algorithms.dpo import as_pairs
    from alignkit.data.comparisons import encode_comparisons
    from alignkit.data.loading import load_records

    records, _ = load_records(w.data, "comparison", limit=w.records)
    comps, _ = encode_comparisons(tokenizer, as_pairs(records), w.max_length)
    return comps


def gsm8k_prompts(w: Workload):
    from alignkit.data.loading import load_records

    records, _ = load_records(w.data, "prompt", limit=w.records)
    return records


def step_tokens(lengths_in_order: list[int], w: Workload) -> list[int]:
    """Real tokens of each optimiser step, from item lengths in consumption order."""
    per_step = w.batch_size * w.grad_accum
    return [sum(lengths_in_order[s * per_step : (s + 1) * per_step]) for s in range(w.total_steps)]


def data_tokens(w: Workload, tokenizer) -> tuple[list[int] | None, int]:
    """Tokens per step as alignkit consumes them (None for GRPO, whose completions are sampled), and the
    tokens of all items the run consumes (alignkit's DPO reference pass scores just those)."""
    if w.kind == "sft":
        items = sft_examples(w, tokenizer)
        lengths = [len(e) for e in items]
    elif w.kind in ("rm", "dpo"):
        items = comparisons(w, tokenizer)
        lengths = [c.tokens for c in items]
    else:
        return None, 0
    if len(lengths) < w.consumed:
        raise SystemExit(f"{w.name}: only {len(lengths)} items left after truncation, {w.consumed} needed")
    order = alignkit_order(len(lengths), w.seed)
    steps = step_tokens([lengths[i] for i in order], w)
    return steps, sum(steps)


# --- identical initialisation of what is random at start (RM head, LoRA A matrices) -------------------------


def init_head(weight: torch.Tensor) -> None:
    """The reward head as alignkit initialises it (std 1/sqrt(H+1)), from a fixed seed on both sides."""
    g = torch.Generator().manual_seed(HEAD_SEED)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=g) / math.sqrt(weight.shape[-1] + 1))


def init_lora(model: torch.nn.Module) -> None:
    """LoRA A matrices from a fixed seed, matched by layer name, so both sides start from the same adapter."""
    params = {}
    for name, p in model.named_parameters():
        if "lora_A" in name and "layers." in name:
            params[name[name.index("layers.") :]] = p
    g = torch.Generator().manual_seed(LORA_SEED)
    with torch.no_grad():
        for key in sorted(params):
            torch.nn.init.kaiming_uniform_(params[key], a=math.sqrt(5), generator=g)


# --- alignkit ------------------------------------------------------------------------------------------------


def run_alignkit(w: Workload, out_dir: Path) -> dict:
    import alignkit.engine as engine

    record: dict = {"reference_s": 0.0, "generation_s": [], "generation_tokens": [], "rewards": []}

    def no_save(module):
        original = module.train

        def train(**kwargs):
            kwargs["save_final"] = lambda model, output: None  # no saving, as on the TRL side
            return original(**kwargs)

        module.train = train

    common = dict(
        output=str(out_dir), max_steps=w.total_steps, batch_size=w.batch_size, grad_accum=w.grad_accum, lr=w.lr,
        weight_decay=w.weight_decay, adam_betas=list(w.adam_betas), max_grad_norm=w.max_grad_norm,
        scheduler="constant", warmup_ratio=0.0, precision="no", seed=w.seed, log_every=1, progress=False,
        model=w.model, lora_r=w.lora_r, lora_alpha=w.lora_alpha, lora_target_modules=list(w.lora_targets),
    )  # fmt: skip
    if w.kind == "sft":
        from alignkit.algorithms import sft

        no_save(sft)
        sft.run_sft(sft.SFTConfig(**common, data=w.data, limit=w.records, max_length=w.max_length))
    elif w.kind == "rm":
        from alignkit.algorithms import rm

        no_save(rm)
        build = rm.build_reward_model

        def build_same_init(*args, **kwargs):
            model = build(*args, **kwargs)
            init_head(model.head.weight)
            init_lora(model.model)
            return model

        rm.build_reward_model = build_same_init
        rm.run_train(rm.RMConfig(**common, data=w.data, limit=w.records, max_length=w.max_length, norm_samples=0))
    elif w.kind == "dpo":
        from alignkit.algorithms import dpo

        no_save(dpo)
        attach = dpo.attach_reference

        def timed_attach(*args, **kwargs):
            start = time.perf_counter()
            attach(*args, **kwargs)
            record["reference_s"] += time.perf_counter() - start

        dpo.attach_reference = timed_attach
        reference = "lora-base" if w.lora_r else "precompute"
        build = dpo.DPOConfig.build_policy

        def build_same_init(self):
            policy = build(self)
            if w.lora_r:
                init_lora(policy.model)
            return policy

        dpo.DPOConfig.build_policy = build_same_init
        dpo.run_dpo(dpo.DPOConfig(**common, data=w.data, limit=w.records, max_length=w.max_length, loss="dpo",
                                  beta=w.beta, reference=reference))  # fmt: skip
    elif w.kind == "grpo":
        from alignkit.algorithms import grpo
        from alignkit.data.tokenize import IGNORE

        no_save(grpo)
        rollout = grpo.GroupRollouts.rollout

        def timed_rollout(self, records, seed):
            start = time.perf_counter()
            batch = rollout(self, records, seed)
            record["generation_s"].append(time.perf_counter() - start)
            record["generation_tokens"].append(int((batch.batch.labels != IGNORE).sum()))
            record["rewards"].append(batch.rewards.mean().item())
            return batch

        grpo.GroupRollouts.rollout = timed_rollout
        grpo.run_grpo(grpo.GRPOConfig(**{**common, "batch_size": w.batch_size}, prompts=w.data, limit=w.records,
                                      reward="gsm8k", num_generations=w.num_generations, max_new_tokens=w.max_new_tokens,
                                      temperature=1.0, top_p=1.0, beta=w.beta, advantage="grpo",
                                      loss_normalisation="sequence", max_prompt_length=w.max_length))  # fmt: skip
    del engine
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_ends = [m["elapsed_s"] for m in metrics]
    cumulative = [m["tokens"] for m in metrics]
    measured = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
    return {
        "losses": [m["loss"] for m in metrics],
        "step_end_s": step_ends,
        "measured_tokens": measured,
        **record,
    }


# --- TRL -----------------------------------------------------------------------------------------------------


def trl_common(w: Workload, out_dir: Path) -> dict:
    return dict(
        output_dir=str(out_dir), max_steps=w.total_steps, per_device_train_batch_size=w.batch_size,
        gradient_accumulation_steps=w.grad_accum, learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=w.weight_decay, adam_beta1=w.adam_betas[0], adam_beta2=w.adam_betas[1], adam_epsilon=1e-8,
        optim="adamw_torch_fused", max_grad_norm=w.max_grad_norm, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0, seed=w.seed,
        activation_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip


def run_trl(w: Workload, out_dir: Path) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    from alignkit.models import load_model, load_tokenizer, resolve

    tokenizer = load_tokenizer(w.model)
    record: dict = {"losses": [], "step_end_s": [], "measured_tokens": [], "generation_s": [], "generation_tokens": [], "rewards": []}
    counted = {"tokens": 0}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            record["step_end_s"].append(time.perf_counter())
            record["measured_tokens"].append(counted["tokens"])
            counted["tokens"] = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["losses"].append(float(logs["loss"]))

    def counting(base, mask_keys=("attention_mask",), sequential=True):
        """The trainer class with a sequential sampler (alignkit's order is baked into the dataset) and a token count."""

        class Counting(base):
            def compute_loss(self, model, inputs, *args, **kwargs):
                if self.model.training:
                    counted["tokens"] += int(sum(inputs[k].sum() for k in mask_keys if k in inputs))
                return super().compute_loss(model, inputs, *args, **kwargs)

            if sequential:

                def _get_train_sampler(self, dataset=None):
                    return SequentialSampler(dataset if dataset is not None else self.train_dataset)

        return Counting

    torch.manual_seed(w.seed)
    if w.kind == "sft":
        from trl import SFTConfig, SFTTrainer

        examples = sft_examples(w, tokenizer)
        examples = [examples[i] for i in alignkit_order(len(examples), w.seed)]
        # alignkit's labels are already shifted (labels[i] is the target of position i); TRL's are not.
        rows = [{"input_ids": e.input_ids, "labels": [-100] + e.labels[:-1]} for e in examples]
        args = SFTConfig(**trl_common(w, out_dir), max_length=w.max_length, packing=False, padding_free=False,
                         dataset_num_proc=None)  # fmt: skip
        trainer = counting(SFTTrainer)(model=load_model(w.model), args=args, train_dataset=Dataset.from_list(rows),
                                       processing_class=tokenizer, callbacks=[Timer()])  # fmt: skip
    elif w.kind == "rm":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        comps = comparisons(w, tokenizer)
        comps = [comps[i] for i in alignkit_order(len(comps), w.seed)]
        rows = [{"chosen_ids": c.responses[0].input_ids, "rejected_ids": c.responses[1].input_ids} for c in comps]
        model = AutoModelForSequenceClassification.from_pretrained(resolve(w.model), num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        init_head(model.score.weight)
        lora = LoraConfig(r=w.lora_r, lora_alpha=w.lora_alpha, lora_dropout=0.0, target_modules=list(w.lora_targets),
                          task_type="SEQ_CLS", modules_to_save=["score"])  # fmt: skip
        model = get_peft_model(model, lora)
        init_lora(model)
        args = RewardConfig(**trl_common(w, out_dir), max_length=None, center_rewards_coefficient=None)
        trainer = counting(RewardTrainer)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                          processing_class=tokenizer, callbacks=[Timer()])  # fmt: skip
    elif w.kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        comps = comparisons(w, tokenizer)
        comps = [comps[i] for i in alignkit_order(len(comps), w.seed)]
        rows = [dpo_row(c) for c in comps]
        model = load_model(w.model)
        if w.lora_r:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=w.lora_r, lora_alpha=w.lora_alpha, lora_dropout=0.0,
                                                     target_modules=list(w.lora_targets), task_type="CAUSAL_LM"))  # fmt: skip
            init_lora(model)
        args = DPOConfig(**trl_common(w, out_dir), max_length=None, loss_type=["sigmoid"], beta=w.beta,
                         precompute_ref_log_probs=False)  # fmt: skip

        class PreTokenised(DPOTrainer):
            def _prepare_dataset(self, dataset, *a, **k):  # already prompt_ids / chosen_ids / rejected_ids
                return dataset

        trainer = counting(PreTokenised)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                         processing_class=tokenizer, callbacks=[Timer()])  # fmt: skip
    elif w.kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        from alignkit.rewards.verifiers import Gsm8kVerifier

        verifier = Gsm8kVerifier()
        prompts = gsm8k_prompts(w)
        prompts = [prompts[i] for i in alignkit_order(len(prompts), w.seed)]
        rows = [{"prompt": [{"role": m.role, "content": m.content} for m in p.prompt], "reference": p.answer} for p in prompts]

        def gsm8k(prompts, completions, reference, **kwargs):
            """alignkit's own GSM8K verifier, so the reward is identical."""
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return verifier.score([()] * len(texts), texts, list(reference)).tolist()

        k = w.num_generations
        args = GRPOConfig(**{**trl_common(w, out_dir), "per_device_train_batch_size": w.batch_size * k},
                          num_generations=k, steps_per_generation=w.grad_accum, num_iterations=1,
                          max_completion_length=w.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=w.beta,
                          epsilon=0.2, loss_type="grpo", scale_rewards="group", mask_truncated_completions=False,
                          shuffle_dataset=False, log_completions=False)  # fmt: skip

        class Timed(GRPOTrainer):
            def _generate_and_score_completions(self, inputs):
                start = time.perf_counter()
                out = super()._generate_and_score_completions(inputs)
                record["generation_s"].append(time.perf_counter() - start)
                record["generation_tokens"].append(int(out["completion_mask"].sum()))
                return out

            def _calculate_rewards(self, *a, **kw):
                rewards = super()._calculate_rewards(*a, **kw)
                record["rewards"].append(float(rewards.float().mean()))
                return rewards

        trainer = counting(Timed, ("prompt_mask", "completion_mask"), sequential=False)(
            model=load_model(w.model), reward_funcs=gsm8k, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[Timer()],
        )
    else:
        raise ValueError(w.kind)
    start = time.perf_counter()
    trainer.train()
    record["step_end_s"] = [t - start for t in record["step_end_s"]]
    return record


def dpo_row(comparison) -> dict:
    """alignkit's tokenised pair as TRL's prompt_ids / chosen_ids / rejected_ids: exactly the trained tokens.

    alignkit trains on the reply and its end-of-turn token; the newline the template puts after it has no
    label and cannot change an earlier log-prob (causal attention), so it is left out of TRL's completion.
    """
    from alignkit.data.tokenize import IGNORE

    def split(example):
        targets = [i for i, label in enumerate(example.labels) if label != IGNORE]
        start, end = targets[0] + 1, targets[-1] + 2  # labels[i] is token i + 1
        return example.input_ids[:start], example.input_ids[start:end]

    (prompt, chosen), (prompt_r, rejected) = (split(r) for r in comparison.responses)
    assert prompt == prompt_r, "chosen and rejected do not share the prompt"
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def count_parameters(name: str) -> int:
    """Parameters of the model (a tied embedding counted once), from its config on the meta device: no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.models import resolve

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(name)))
    return sum(p.numel() for p in model.parameters())


# --- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("side", choices=["alignkit", "trl"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w = workloads(args.steps or None)[args.workload]

    import transformers

    transformers.logging.set_verbosity_error()
    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer(w.model)
    tokens, tokens_read = data_tokens(w, tokenizer)
    n_params = count_parameters(w.model)
    with tempfile.TemporaryDirectory(prefix=f"bench-{w.name}-{args.side}-") as tmp:
        started = time.perf_counter()
        run = run_alignkit(w, Path(tmp)) if args.side == "alignkit" else run_trl(w, Path(tmp))
        total_s = time.perf_counter() - started
    ends = run["step_end_s"]
    if len(ends) != w.total_steps:
        raise SystemExit(f"expected {w.total_steps} steps, saw {len(ends)}")
    if tokens is None:  # GRPO: each side's own count of the sampled rows
        tokens = run["measured_tokens"]
    timed_s = ends[-1] - ends[0]
    train_tokens = sum(tokens[1:])
    if run.get("reference_s"):  # alignkit DPO: the one reference pass over the data consumed; the timed steps' share
        timed_s += run["reference_s"] * train_tokens / tokens_read
    rows_per_item = {"sft": 1, "rm": 1, "dpo": 1, "grpo": w.num_generations}[w.kind]
    gen_tokens = sum(run["generation_tokens"][1:]) if run["generation_tokens"] else 0
    # Forward-only work: the reference pass of DPO / GRPO (one forward per trained token), and generation.
    forward_tokens = (train_tokens if (w.kind == "dpo" or (w.kind == "grpo" and w.beta > 0)) else 0) + gen_tokens
    result = {
        "workload": w.name,
        "side": args.side,
        "settings": w.to_json(),
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "timed_steps": w.steps,
        "timed_s": timed_s,
        "total_s": total_s,
        "train_tokens": train_tokens,
        "tokens_per_step": tokens,
        "measured_tokens_per_step": run["measured_tokens"],
        "tokens_per_s": train_tokens / timed_s,
        "samples_per_s": w.steps * w.batch_size * w.grad_accum * rows_per_item / timed_s,
        "generation_tokens": gen_tokens,
        "generation_s": sum(run["generation_s"][1:]),
        "forward_tokens": forward_tokens,
        # A frozen weight gets no weight gradient: LoRA training costs 4·N a token (forward and input gradient).
        "flops": (4 if w.lora_r else 6) * n_params * train_tokens + 2 * n_params * forward_tokens,
        "peak_rss_mb": peak_rss_mb(),
        "losses": run["losses"],
        "rewards": run["rewards"],
        "reference_s": run.get("reference_s", 0.0),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
