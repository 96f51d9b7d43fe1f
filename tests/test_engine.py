"""The shared training loop: schedules, deterministic data streams, packing isolation, chunked log-probs,
rows continuing a shared prefix, exact resume after kill -9, and 2-process DDP equal to 1 process with
twice the accumulation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignkit.data.tokenize import IGNORE, Example, collate, collate_packed_shared, collate_with_prefixes
from alignkit.engine import PhaseMix, Shuffled, lr_multiplier, peak_memory_mb, reset_peak_memory
from alignkit.logprobs import TokenLogprobModel, batch_logprobs, target_logprobs
from alignkit.models import TINY_LLAMA, enable_activation_checkpointing, load_model
from conftest import SFT_DATA, read_metrics, run_cli


@pytest.mark.parametrize(
    "kind, step, expected",
    [
        ("cosine", 0, 0.5), ("cosine", 1, 1.0), ("cosine", 2, 1.0), ("cosine", 6, 0.5),
        ("cosine", 9, 0.5 * (1 + math.cos(math.pi * 7 / 8))),
        ("linear", 6, 0.5), ("linear", 2, 1.0), ("constant", 9, 1.0), ("constant", 0, 0.5),
        ("wsd", 5, 1.0), ("wsd", 6, 0.8), ("wsd", 9, 0.2),
    ],
)
def test_lr_schedules_by_hand(kind, step, expected):
    assert lr_multiplier(step, 10, kind=kind, warmup=2, decay_steps=4, min_ratio=0.0) == pytest.approx(expected)


def test_min_lr_ratio_is_the_floor():
    assert lr_multiplier(9, 10, kind="linear", warmup=0, decay_steps=0, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.1)


def test_streams_are_deterministic_and_skip_equals_consuming():
    items = list(range(10))

    def take(stream, n):
        it = iter(stream)
        return [next(it) for _ in range(n)]

    full = take(Shuffled(items, 3, list, seed=1), 12)
    assert sorted(x for batch in full[:4] for x in batch) == items  # one epoch covers every item once
    assert full[:4] != full[4:8]  # each epoch is reshuffled
    skipped = Shuffled(items, 3, list, seed=1)
    skipped.skip(5)
    assert take(skipped, 7) == full[5:]
    # What the first n micro-batches serve, without collating them: a reference pass scores just these.
    for n in (1, 3, 4, 9):
        assert Shuffled(items, 3, list, seed=1).served(n) == {x for batch in full[:n] for x in batch}

    def mix():
        return PhaseMix(Shuffled(items, 2, list, 1), Shuffled([-i for i in items], 2, list, 2), lambda g: 0.5 if g >= 4 else 0.0, 3)

    mixed = take(mix(), 20)
    assert all(x >= 0 for batch in mixed[:4] for x in batch)  # nothing from the second stream before the decay
    assert any(x < 0 for batch in mixed for x in batch)
    later = mix()
    later.skip(9)
    assert take(later, 11) == mixed[9:]


def test_chunked_target_logprobs_match_full_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(37, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    chunked = target_logprobs(hidden, weight, None, targets, chunk_size=5)
    full = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(chunked, full)
    g_chunked = torch.autograd.grad(chunked.sum(), (hidden, weight))
    g_full = torch.autograd.grad(full.sum(), (hidden, weight))
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b)


def test_packed_examples_do_not_attend_to_each_other(tiny_tokenizer):
    model = TokenLogprobModel(load_model(TINY_LLAMA)).eval()
    texts = ["The cat sat on the mat.", "A completely different example, longer than the first one."]
    examples = []
    for text in texts:
        ids = tiny_tokenizer(text)["input_ids"]
        examples.append(Example(ids, ids[1:] + [IGNORE]))
    with torch.no_grad():
        packed = batch_logprobs(model, collate([examples], tiny_tokenizer.pad_token_id))[0]
        separate = batch_logprobs(model, collate([[e] for e in examples], tiny_tokenizer.pad_token_id))
    n0 = len(examples[0])
    torch.testing.assert_close(packed[:n0], separate[0, :n0])
    torch.testing.assert_close(packed[n0 : n0 + len(examples[1])], separate[1, : len(examples[1])])
    # And the check can fail: without the restarting positions, the second example would see the first.
    batch = collate([examples], tiny_tokenizer.pad_token_id)
    leaky = model(batch.input_ids, batch.labels, torch.arange(batch.input_ids.shape[1])[None], None)[0]
    assert not torch.allclose(leaky[n0 : n0 + len(examples[1])], separate[1, : len(examples[1])], atol=1e-4)


def test_rows_continuing_shared_prefixes_are_laid_out_by_hand():
    batch = collate_with_prefixes([[5, 6, 7], [9, 4]], [[8, 2], [8, 9, 10], [3], [4, 5]], pad_id=0)
    assert batch.prefix is not None
    assert batch.prefix.input_ids.tolist() == [[5, 6], [9, 0]] and batch.prefix.attention_mask.tolist() == [[1, 1], [1, 0]]
    # A row is the prefix's last token then the continuation but its last token: position t predicts token t.
    assert batch.input_ids.tolist() == [[7, 8, 0], [7, 8, 9], [4, 0, 0], [4, 4, 0]]
    assert batch.labels.tolist() == [[8, 2, IGNORE], [8, 9, 10], [3, IGNORE, IGNORE], [4, 5, IGNORE]]
    assert [row[:n] for row, n in zip(batch.position_ids.tolist(), [2, 3, 1, 2])] == [[2, 3], [2, 3, 4], [1], [1, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0]]
    assert batch.n_tokens == (3 + 2) + (3 + 3) + (2 + 1) + (2 + 2)  # every row's whole sequence, as for full rows
    with pytest.raises(ValueError, match="evenly"):
        collate_with_prefixes([[5, 6], [7]], [[1], [2], [3]], pad_id=0)


def test_responses_after_one_copy_of_their_prompt_are_laid_out_by_hand():
    i = IGNORE
    a, b = Example([3, 5, 7, 9, 4], [i, i, 9, 4, i]), Example([3, 5, 7, 6], [i, i, 6, i])
    c, d = Example([8, 2, 4], [i, 4, i]), Example([8, 2, 6, 1], [i, 6, 1, i])
    batch = collate_packed_shared([[a, b], [c, d]], max_length=16, pad_id=0)
    # Shared: the leading tokens both hold and neither trains on ([3, 5]; [8]); position 2 of a and b predicts.
    assert batch.input_ids.tolist() == [[3, 5, 7, 9, 4, 7, 6, 8, 2, 4, 2, 6, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3]]
    assert batch.labels.tolist() == [[i, i, 9, 4, i, 6, i, i, 4, i, 6, 1, i]]
    assert batch.example_index.tolist() == [[-1, -1, 0, 0, 0, 1, 1, -1, 2, 2, 3, 3, 3]]
    assert batch.ends.tolist() == [4, 6, 9, 12] and batch.n_tokens == 16
    mask = batch.attention_mask[0, 0]
    assert mask[5].tolist() == [1, 1, 0, 0, 0, 1] + [0] * 7  # b's first token: the prompt and itself, not a
    assert mask[10].tolist() == [0] * 7 + [1, 0, 0, 1, 0, 0]  # d: its own prompt only, nothing of the first pair
    assert torch.equal(mask, mask & torch.ones(13, 13, dtype=torch.bool).tril())


@pytest.mark.parametrize("lora", [False, True])
def test_rows_continuing_shared_prefixes_score_as_their_full_sequences(lora, monkeypatch):
    """Log-probs and gradients through the repeated KV cache equal those of the full rows, and the start-up
    check that decides it can fail: a decoder that is not handed the cache leaves it empty."""
    model = load_model(TINY_LLAMA)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # non-zero, so the adapter changes what the prefix's cache holds
    policy = TokenLogprobModel(model)
    prefixes, continuations = [[5, 6, 7, 9, 11], [12, 4]], [[8, 2], [8, 9, 10], [3], [4, 5, 6, 7]]
    shared = collate_with_prefixes(prefixes, continuations, pad_id=0)
    rows = [[Example(prefixes[i // 2] + c, [IGNORE] * (len(prefixes[i // 2]) - 1) + c + [IGNORE])] for i, c in enumerate(continuations)]
    full = collate(rows, pad_id=0)
    mine, theirs = batch_logprobs(policy, shared), batch_logprobs(policy, full)
    torch.testing.assert_close(mine.sum(-1), theirs.sum(-1))
    assert sorted(mine[mine != 0].tolist()) == pytest.approx(sorted(theirs[theirs != 0].tolist()), abs=1e-5)
    params = [p for p in policy.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(mine.sum(), params), torch.autograd.grad(theirs.sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert shared.n_tokens == full.n_tokens

    assert policy.shares_prefixes() and policy.training
    monkeypatch.setattr("alignkit.logprobs.with_cache", lambda module, cache: {})
    assert not policy.shares_prefixes() and policy.training


def test_gradient_checkpointing_scores_full_rows():
    model = load_model(TINY_LLAMA)
    enable_activation_checkpointing(model)
    assert not TokenLogprobModel(model).shares_prefixes()


SFT_ARGS = ["--model", TINY_LLAMA, "--data", str(SFT_DATA), "--batch-size", "4", "--max-length", "128", "--lr", "3e-3", "--no-progress"]


def test_kill_9_mid_run_then_resume_ends_at_the_same_loss(tmp_path):
    steps = "120"
    straight = tmp_path / "straight"
    assert run_cli("sft", *SFT_ARGS, "--max-steps", steps, "--output", str(straight)).returncode == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "alignkit", "sft", *SFT_ARGS, "--max-steps", steps, "--save-every", "10", "--output", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any((killed / "checkpoints").glob("step-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it wrote a checkpoint"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"

    resumed = run_cli("sft", *SFT_ARGS, "--max-steps", steps, "--save-every", "10", "--output", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    summary = json.loads((killed / "summary.json").read_text())
    reference = json.loads((straight / "summary.json").read_text())
    assert summary["resumed_from"] > 0
    assert summary["steps"] == reference["steps"] == int(steps)
    assert summary["final_loss"] == pytest.approx(reference["final_loss"], abs=1e-4)
    assert summary["tokens"] == reference["tokens"]
    steps_logged = [m["step"] for m in read_metrics(killed)]
    assert steps_logged == list(range(1, int(steps) + 1))  # every step once, none twice
    ours = [m["loss"] for m in read_metrics(killed)]
    theirs = [m["loss"] for m in read_metrics(straight)]
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_two_process_ddp_equals_one_process_with_twice_the_accumulation(tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    result = run_cli("sft", *SFT_ARGS, "--max-steps", "6", "--grad-accum", "2", "--output", str(one))
    assert result.returncode == 0, result.stderr
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "alignkit",
        "sft", *SFT_ARGS, "--max-steps", "6", "--grad-accum", "1", "--output", str(two),
    ]  # fmt: skip
    result = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_metrics(one), read_metrics(two)
    assert [m["tokens"] for m in a] == [m["tokens"] for m in b]
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    # Gradients are summed in another order across processes; Adam's division by sqrt(v) turns that rounding
    # into update differences of up to ~1e-4 on weights whose gradient is almost zero.
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resident high-water mark resets on Linux only")
def test_reset_peak_memory_starts_the_peak_afresh_as_each_pipeline_stage_does():
    reset_peak_memory()
    before = peak_memory_mb()
    held = torch.ones(400 * 2**20 // 4)  # 400 MiB touched, then freed
    assert peak_memory_mb() >= before + 300
    del held
    reset_peak_memory()
    assert peak_memory_mb() < before + 300
