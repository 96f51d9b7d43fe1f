"""The rollout engine: K completions per prompt, greedy determinism, and prefix sharing that changes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.data.records import user_prompt
from alignkit import generation
from alignkit.fused import lean_activations
from alignkit.generation import SamplingParams, TransformersGenerator, next_tokens
from alignkit.models import TINY_LLAMA, load_model
from conftest import run_cli

PROMPTS = [user_prompt("Tell me a story about a cat."), user_prompt("Hi"), user_prompt("What is the capital of France and why?")]


def generator(tiny_tokenizer, batch_size=2):
    return TransformersGenerator(load_model(TINY_LLAMA), tiny_tokenizer, batch_size=batch_size)


def test_k_completions_per_prompt_in_prompt_order(tiny_tokenizer):
    samples = generator(tiny_tokenizer).generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=1))
    assert [s.prompt for s in samples] == PROMPTS
    for sample in samples:
        assert len(sample.completions) == 3
        for completion in sample.completions:
            assert len(completion.token_ids) <= 12
            assert completion.finished or len(completion.token_ids) == 12
    texts = [c.text for s in samples for c in s.completions]
    assert len(set(texts)) > 3  # sampling gives different answers


def test_shared_prefix_greedy_equals_plain_greedy(tiny_tokenizer):
    gen = generator(tiny_tokenizer)
    single = gen.generate(PROMPTS, SamplingParams(n=1, temperature=0, max_new_tokens=10))
    shared = gen.generate(PROMPTS, SamplingParams(n=2, temperature=0, max_new_tokens=10))
    for one, two in zip(single, shared):
        assert two.completions[0].token_ids == two.completions[1].token_ids == one.completions[0].token_ids


def test_batching_does_not_change_greedy_output(tiny_tokenizer):
    one_by_one = generator(tiny_tokenizer, batch_size=1).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    batched = generator(tiny_tokenizer, batch_size=3).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    assert [s.completions[0].token_ids for s in one_by_one] == [s.completions[0].token_ids for s in batched]


def test_a_padded_row_decodes_with_the_logits_of_its_unpadded_sequence(tiny_tokenizer, monkeypatch):
    """Left padding and the copied prompt cache must leave a row exactly what training will see: same positions,
    same attention. The shortest prompt is the last, most padded row of the batch."""
    model = load_model(TINY_LLAMA)
    seen = []

    def recording(logits, temperature, top_p):
        if logits.shape[0] == 6:  # while no row has finished and left the batch
            seen.append(logits[-1].clone())
        return next_tokens(logits, temperature, top_p)

    monkeypatch.setattr(generation, "next_tokens", recording)
    samples = TransformersGenerator(model, tiny_tokenizer, batch_size=3).generate(PROMPTS, SamplingParams(n=2, temperature=0, max_new_tokens=8))
    shortest = min(samples, key=lambda s: len(s.prompt_token_ids))
    answer = shortest.completions[1].trained_ids
    with torch.no_grad():
        logits = model(torch.tensor([shortest.prompt_token_ids + answer])).logits[0]
    start = len(shortest.prompt_token_ids) - 1
    steps = min(len(seen), len(answer))
    assert steps >= 4
    torch.testing.assert_close(torch.stack(seen[:steps]), logits[start : start + steps], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN packs weights on x86 and ARM CPUs")
def test_packed_weights_give_the_same_logits_and_are_dropped_afterwards():
    model = load_model(TINY_LLAMA).eval()
    lean_activations(model)  # as in training: the lean MLP must run its down projection as the module
    ids = torch.tensor([[5, 9, 2, 7], [3, 3, 8, 1]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with generation.packed_linears(model, rows=2):
            assert all("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)
            packed = model(input_ids=ids).logits
            packed_one_row = model(input_ids=ids[:1]).logits
        assert not any("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)
        assert torch.allclose(packed, plain, atol=1e-5) and torch.allclose(packed_one_row, plain[:1], atol=1e-5)
        # A weight changed since (an optimiser step) is packed afresh by the next call.
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
        changed = model(input_ids=ids).logits
        assert not torch.allclose(changed, plain, atol=1e-3)
        with generation.packed_linears(model, rows=2):
            assert torch.allclose(model(input_ids=ids).logits, changed, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16), generation.packed_linears(model, rows=2):
            assert not any("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)


def test_nucleus_keeps_the_smallest_set_of_top_tokens_reaching_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(2000, 3)
    torch.manual_seed(0)
    assert set(next_tokens(logits, 1.0, 0.5).tolist()) == {0}
    counts = torch.bincount(next_tokens(logits, 1.0, 0.6), minlength=3)
    assert counts[2] == 0 and counts[1] / counts.sum() == pytest.approx(0.3 / 0.8, abs=0.04)
    assert set(next_tokens(logits, 1.0, 1.0).tolist()) == {0, 1, 2}
    assert next_tokens(logits[:1], 0.0, 1.0).tolist() == [0]


def test_sampling_is_reproducible_from_the_seed(tiny_tokenizer):
    gen = generator(tiny_tokenizer)
    a = gen.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=7))
    b = gen.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=7))
    assert [c.token_ids for s in a for c in s.completions] == [c.token_ids for s in b for c in s.completions]


def test_generate_command_writes_jsonl(tmp_path):
    out = tmp_path / "samples.jsonl"
    result = run_cli(
        "generate", "--model", TINY_LLAMA, "--prompts", "builtin:vicuna80", "--limit", "3",
        "--num-samples", "2", "--max-new-tokens", "8", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert set(rows[0]) == {"prompt", "completions", "prompt_tokens", "completion_tokens", "finished"}
    assert len(rows[0]["completions"]) == 2 and all(n <= 8 for n in rows[0]["completion_tokens"])


def test_best_of_n_keeps_the_highest_scoring_completion(tmp_path):
    reward = tmp_path / "r.py"
    reward.write_text("def length(prompts, completions, references):\n    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "best.jsonl"
    result = run_cli(
        "generate", "--model", TINY_LLAMA, "--prompts", "builtin:vicuna80", "--limit", "3",
        "--best-of", "4", "--scorer", f"python:{reward}:length", "--max-new-tokens", "8", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for row in map(json.loads, out.read_text().splitlines()):
        assert len(row["completions"]) == len(row["scores"]) == 4
        assert row["best_score"] == max(row["scores"]) == float(len(row["best"]))
        assert row["best"] in row["completions"]


def test_rejection_sampling_fine_tunes_on_the_kept_answers(tmp_path):
    from alignkit.algorithms.rsft import RSFTConfig, run_rsft

    reward = tmp_path / "r.py"
    reward.write_text("def has_e(prompts, completions, references):\n    return [float('e' in c) for c in completions]\n")
    config = RSFTConfig(model=TINY_LLAMA, prompts="builtin:vicuna80", prompt_limit=8,
                        scorer=f"python:{reward}:has_e", min_score=1.0, num_samples=4, max_new_tokens=12,
                        output=str(tmp_path / "out"), max_steps=2, progress=False)  # fmt: skip
    summary = run_rsft(config)
    kept = [json.loads(line) for line in (tmp_path / "out" / "best_of_n.jsonl").read_text().splitlines()]
    assert kept and all("e" in row["completion"] and row["score"] == 1.0 for row in kept)
    assert summary["train_examples"] == len(kept) and summary["steps"] == 2
