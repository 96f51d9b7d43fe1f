"""The rollout engine: K completions per prompt, greedy determinism, and prefix sharing that changes nothing."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
import torch

from alignkit.data.records import user_prompt
from alignkit.data.tokenize import prompt_ids
from alignkit import generation
from alignkit.errors import AlignkitError
from alignkit.fused import lean_activations
from alignkit.generation import SamplingParams, TransformersGenerator, next_tokens
from alignkit.models import TINY_LLAMA, load_model, with_cache
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

    def recording(logits, *args):
        if logits.shape[0] == 6:  # while no row has finished and left the batch
            seen.append(logits[-1].clone())
        return next_tokens(logits, *args)

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
    draws = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    assert set(next_tokens(logits, 1.0, 0.5, draws).tolist()) == {0}
    counts = torch.bincount(next_tokens(logits, 1.0, 0.6, draws), minlength=3)
    assert counts[2] == 0 and counts[1] / counts.sum() == pytest.approx(0.3 / 0.8, abs=0.04)
    assert set(next_tokens(logits, 1.0, 1.0, draws).tolist()) == {0, 1, 2}
    assert next_tokens(logits[:1], 0.0, 1.0, draws[:1]).tolist() == [0]


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


def test_best_of_n_with_a_cut_penalty_picks_a_finished_answer_over_a_cut_one():
    from alignkit.generation import Completion, Sample, best_of_n

    answers = [Completion("loops to the cap", [1] * 8, finished=False), Completion("ends", [2], finished=True)]
    samples = [Sample(user_prompt("q"), [0], answers), Sample(user_prompt("r"), [0], answers[:1] * 2)]
    scores = torch.tensor([1.0, 0.6, 1.0, 0.5])
    plain, penalised = best_of_n(samples, scores), best_of_n(samples, scores, cut_penalty=1.0)
    assert plain[0]["best"] == "loops to the cap" and plain[0]["best_score"] == 1.0
    assert penalised[0]["best"] == "ends" and penalised[0]["scores"] == pytest.approx([0.0, 0.6])
    # With every answer cut, the best cut one is still picked, at its lowered score.
    assert penalised[1]["best_score"] == pytest.approx(0.0) and penalised[1]["scores"] == pytest.approx([0.0, -0.5])


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


# Continuous batching. The stored tiny model's logits are nearly uniform and its greedy answer repeats one token,
# so these tests redraw its matrices larger: greedy answers then follow the context. It never ends an answer by
# itself, so the tests stop on tokens it does produce (`stop_ids` is the generator's list of end-of-turn ids).
JOIN_PROMPTS = [user_prompt(t) for t in (
    "Hi", "Tell me a story about a cat.", "What is the capital of France and why?", "Name three colours.",
    "Explain how rain forms, step by step, for a child who asks why the sky is grey.", "Add 2 and 3.",
    "Write a haiku about autumn leaves falling slowly", "Why?",
)]  # fmt: skip
STOPS = [69, 364, 688, 876]  # greedy answers alone then end after 1, 4, 7, 10 and 3 tokens, or reach 12
MANY_STOPS = list(range(0, 1000, 25))  # sampled answers end after a few tokens to a dozen


@pytest.fixture(scope="module")
def sharp_model():
    model = load_model(TINY_LLAMA)
    draws = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.copy_(torch.randn(weight.shape, generator=draws) * 0.3)
    return model


def stopping_generator(model, tokenizer, batch_size, stops=STOPS, refill=True):
    gen = TransformersGenerator(model, tokenizer, batch_size=batch_size, refill=refill)
    gen.stop_ids = stops
    return gen


@contextlib.contextmanager
def forward_calls(model):
    """Inside it, every forward pass of `model` appends to the list it yields: tokens per row, the attention
    mask, and the cache's width."""
    calls = []
    cache_keyword = next(iter(with_cache(model, None)))

    def record(module, args, kwargs):
        calls.append((kwargs["input_ids"].shape[1], kwargs["attention_mask"].clone(), kwargs[cache_keyword].get_seq_length()))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def token_ids(samples):
    return [[c.token_ids for c in s.completions] for s in samples]


def test_prompts_join_mid_decode_and_keep_their_greedy_answer_alone(sharp_model, tiny_tokenizer):
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    alone = stopping_generator(sharp_model, tiny_tokenizer, batch_size=1).generate(JOIN_PROMPTS, greedy)
    lengths = [len(s.completions[0].token_ids) for s in alone]
    assert len(set(lengths)) >= 5 and 12 in lengths and min(lengths) < 12  # answers end at different steps
    with forward_calls(sharp_model) as calls:
        joined = stopping_generator(sharp_model, tiny_tokenizer, batch_size=3).generate(JOIN_PROMPTS, greedy)
    k_joined = stopping_generator(sharp_model, tiny_tokenizer, batch_size=2).generate(JOIN_PROMPTS, replace(greedy, n=2))
    assert token_ids(joined) == token_ids(alone)
    assert token_ids(k_joined) == [[ids[0], ids[0]] for ids in token_ids(alone)]
    # A prefill followed by a decoding step over more rows than it prefilled (one row per prompt here): the
    # prefilled prompts joined rows that were running.
    assert any(a[0] > 1 and b[0] == 1 and b[1].shape[0] > a[1].shape[0] for a, b in zip(calls, calls[1:]))


def test_fixed_batches_give_the_same_answers(sharp_model, tiny_tokenizer):
    greedy = SamplingParams(n=2, temperature=0, max_new_tokens=12)
    fixed = stopping_generator(sharp_model, tiny_tokenizer, batch_size=3, refill=False).generate(JOIN_PROMPTS, greedy)
    refilled = stopping_generator(sharp_model, tiny_tokenizer, batch_size=3).generate(JOIN_PROMPTS, greedy)
    assert token_ids(fixed) == token_ids(refilled)


def test_a_prompt_longer_than_the_running_rows_joins_them(sharp_model, tiny_tokenizer):
    """`generate` admits the longest prompts first, so a joining prompt only ever pads itself; admitted shortest
    first, the running rows are the ones left-padded to the joining prompt's width."""
    gen = stopping_generator(sharp_model, tiny_tokenizer, batch_size=2)
    encoded = [prompt_ids(tiny_tokenizer, p) for p in JOIN_PROMPTS]
    params = SamplingParams(n=2, temperature=0, max_new_tokens=12)
    with forward_calls(sharp_model) as calls, torch.no_grad():
        answers = gen._sample_all(encoded, sorted(range(len(encoded)), key=lambda i: len(encoded[i])), params)
    alone = stopping_generator(sharp_model, tiny_tokenizer, batch_size=1).generate(JOIN_PROMPTS, params)
    assert [[answers[i, k][0] for k in range(2)] for i in range(len(encoded))] == token_ids(alone)
    widths = [mask.shape[1] for length, mask, _ in calls if length == 1]
    # Between two decoding steps the mask grows by the token fed, or shrinks when the longest row leaves; it
    # grows by more only where a wider prompt joined and the running rows were left-padded to its width.
    assert any(b > a + 1 for a, b in zip(widths, widths[1:]))


def test_a_joined_row_decodes_with_the_logits_of_its_sequence_alone(sharp_model, tiny_tokenizer, monkeypatch):
    """Every row of logits that sampling saw is the one its (prompt, answer so far) gets in a forward pass of its
    own, and every such row was seen once: no row got another's logits or missed a step."""
    seen = []

    def recording(logits, *args):
        seen.append(logits.clone())
        return next_tokens(logits, *args)

    monkeypatch.setattr(generation, "next_tokens", recording)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5)
    samples = stopping_generator(sharp_model, tiny_tokenizer, batch_size=2, stops=MANY_STOPS).generate(JOIN_PROMPTS, params)
    expected = []
    with torch.no_grad():
        for sample in samples:
            for completion in sample.completions:
                answer = completion.trained_ids
                logits = sharp_model(torch.tensor([sample.prompt_token_ids + answer])).logits[0]
                start = len(sample.prompt_token_ids) - 1
                expected.append(logits[start : start + len(answer)])
    assert len({len(c.token_ids) for s in samples for c in s.completions}) >= 4
    seen_rows, expected_rows = torch.cat(seen), torch.cat(expected)
    assert seen_rows.shape == expected_rows.shape
    distance = (seen_rows[:, None, :] - expected_rows[None, :, :]).abs().amax(-1)
    tolerance = 1e-5 * expected_rows.abs().max()
    unmatched = torch.ones(len(expected_rows), dtype=torch.bool)
    for row in distance:  # the K samples of a prompt share their first logits: a match may have twins
        nearest = int(row.masked_fill(~unmatched, float("inf")).argmin())
        assert row[nearest] < tolerance
        unmatched[nearest] = False


def test_seeded_samples_repeat_and_do_not_depend_on_batching(sharp_model, tiny_tokenizer):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=11)
    runs = [
        stopping_generator(sharp_model, tiny_tokenizer, batch_size=b, stops=MANY_STOPS, refill=r).generate(JOIN_PROMPTS, params)
        for b, r in [(2, True), (2, True), (1, True), (3, False)]
    ]  # fmt: skip
    assert len({len(c.token_ids) for s in runs[0] for c in s.completions}) >= 4  # rows leave, prompts join
    assert token_ids(runs[0]) == token_ids(runs[1]) == token_ids(runs[2]) == token_ids(runs[3])
    assert token_ids(runs[0]) != token_ids(stopping_generator(sharp_model, tiny_tokenizer, 2, MANY_STOPS).generate(
        JOIN_PROMPTS, replace(params, seed=12)))


def test_the_cache_is_as_wide_as_the_longest_live_row(sharp_model, tiny_tokenizer):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12)
    with forward_calls(sharp_model) as calls:
        stopping_generator(sharp_model, tiny_tokenizer, batch_size=2, stops=MANY_STOPS).generate(JOIN_PROMPTS * 3, params)
    decoding = [(mask, cached) for length, mask, cached in calls if length == 1]
    assert len(decoding) > 20
    for mask, cached in decoding:
        # Each row's mask is zeros then ones, and some row's ones fill it: no column every row masks out stays.
        assert mask.shape[1] == cached + 1 == int(mask.sum(1).max())
        assert torch.equal(mask, mask.sort(dim=1).values)
    widths = [cached for _, cached in decoding]
    assert any(b < a for a, b in zip(widths, widths[1:]))  # trimmed when the longest row left


def test_a_cache_that_cannot_be_merged_decodes_fixed_batches_and_refuses_refill(tiny_tokenizer):
    model = load_model(TINY_LLAMA)
    model.config.sliding_window = 4  # the cache then keeps a window per layer, which rows cannot be merged into
    default = TransformersGenerator(model, tiny_tokenizer)
    assert default.refill is False and TransformersGenerator(load_model(TINY_LLAMA), tiny_tokenizer).refill is True
    assert len(default.generate(PROMPTS[:2], SamplingParams(max_new_tokens=2))) == 2
    with pytest.raises(AlignkitError, match="DynamicSlidingWindowLayer"):
        TransformersGenerator(model, tiny_tokenizer, refill=True).generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
