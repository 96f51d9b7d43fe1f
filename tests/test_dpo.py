"""DPO family on the tiny model: every loss learns a learnable preference; reference handling; bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.algorithms.dpo import DPOConfig, as_pairs, attach_reference, onpolicy_pairs, pair_logps, run_dpo
from alignkit.data.comparisons import collate_comparisons, encode_comparisons
from alignkit.data.loading import load_records
from alignkit.logprobs import TokenLogprobModel
from alignkit.models import SMOLLM2, TINY_LLAMA, LoraSettings, apply_lora, load_model
from alignkit.reference import sequence_logprobs
from conftest import builtin_rows, read_metrics, run_cli, write_jsonl


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"Sure! {i} plus {i} is {2 * i}.", "rejected": "no."} for i in range(100)]
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


def config(tmp_path, data, **overrides) -> DPOConfig:
    settings = dict(model=TINY_LLAMA, data=str(data), output=str(tmp_path / "out"), max_steps=20, batch_size=8,
                    lr=3e-3, max_length=96, eval_fraction=0.2, progress=False)  # fmt: skip
    settings.update(overrides)
    cfg = DPOConfig(**settings)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo"])
def test_every_loss_learns_a_learnable_preference(tmp_path, prefs, loss):
    overrides = {"ipo": {"beta": 0.5, "lr": 1e-2}}.get(loss, {})
    summary = run_dpo(config(tmp_path, prefs, loss=loss, **overrides))
    assert summary["eval_after"]["accuracy"] >= 0.9, summary["eval_after"]
    assert summary["eval_after"]["margin"] > summary["eval_before"]["margin"]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
            "logps/rejected", "length/chosen", "length/rejected"} <= set(metrics[-1])  # fmt: skip
    # SimPO and ORPO are reference-free: no reference pass, no cache.
    assert (tmp_path / "out" / "reference_logps.pt").exists() == (loss not in ("simpo", "orpo"))


def test_reference_cache_is_reused_and_refused_for_another_model(tmp_path, prefs):
    cache = tmp_path / "ref.pt"
    run_dpo(config(tmp_path / "a", prefs, max_steps=2, reference_cache=str(cache)))
    stamp = cache.stat().st_mtime_ns
    run_dpo(config(tmp_path / "b", prefs, max_steps=2, reference_cache=str(cache)))
    assert cache.stat().st_mtime_ns == stamp  # read, not recomputed
    other_model = tmp_path / "a" / "out"  # the model DPO just trained: a different model
    result = run_cli("dpo", "--model", str(other_model), "--data", str(prefs), "--output", str(tmp_path / "c"),
                     "--reference-cache", str(cache), "--max-steps", "1", "--max-length", "96", "--eval-fraction", "0.2")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "reference cache was made for another model" in result.stderr and str(cache) in result.stderr


def test_a_short_run_scores_only_the_pairs_it_trains_on_and_a_longer_one_adds_the_rest(tmp_path, prefs, tiny_tokenizer):
    partial, full = tmp_path / "partial.pt", tmp_path / "full.pt"
    run_dpo(config(tmp_path / "a", prefs, max_steps=2, batch_size=4, reference_cache=str(partial)))
    scored = torch.load(partial, weights_only=True)["logps"]
    # 80 training pairs, 2 steps of 4: 8 pairs, 16 responses.
    assert len(scored) == 160 and sum(not math.isnan(x) for x in scored) == 16
    # Trained on a reference cache of every pair instead: the same losses.
    model = TokenLogprobModel(load_model(TINY_LLAMA))
    cfg = config(tmp_path / "b", prefs, max_steps=2, batch_size=4, reference_cache=str(full))
    records, _ = cfg.load_train_eval("comparison", cfg.seed, print)
    comparisons, _ = encode_comparisons(tiny_tokenizer, as_pairs(records), cfg.max_length)
    attach_reference(model, cfg, comparisons, tiny_tokenizer.pad_token_id, full)
    assert not any(math.isnan(x) for x in torch.load(full, weights_only=True)["logps"])
    run_dpo(cfg)
    losses = [[m["loss"] for m in read_metrics(tmp_path / run / "out")] for run in ("a", "b")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # A longer run on the partial cache computes the missing pairs it needs, keeping those already there.
    run_dpo(config(tmp_path / "c", prefs, max_steps=6, batch_size=4, reference_cache=str(partial)))
    grown = torch.load(partial, weights_only=True)["logps"]
    assert sum(not math.isnan(x) for x in grown) > 16
    assert all(g == s for g, s in zip(grown, scored) if not math.isnan(s))


def comparisons_and_lora_policy(tokenizer, prefs):
    """Six encoded pairs, and a LoRA policy whose adapter is non-trivial, so it differs from its base."""
    records, _ = load_records(str(prefs), "preference", limit=6)
    comparisons, _ = encode_comparisons(tokenizer, records, 96)
    model = TokenLogprobModel(apply_lora(load_model(TINY_LLAMA), LoraSettings(r=4)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return comparisons, model


def test_lora_base_reference_equals_precomputed_reference(tiny_tokenizer, prefs):
    comparisons, model = comparisons_and_lora_policy(tiny_tokenizer, prefs)
    base = TokenLogprobModel(load_model(TINY_LLAMA))
    precomputed = sequence_logprobs(base, [r for c in comparisons for r in c.responses], tiny_tokenizer.pad_token_id)
    batch = collate_comparisons(comparisons, tiny_tokenizer.pad_token_id)
    p = pair_logps(model, batch, "lora-base", needs_reference=True)
    torch.testing.assert_close(p.ref_chosen, torch.tensor(precomputed[0::2]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(p.ref_rejected, torch.tensor(precomputed[1::2]), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(p.chosen, p.ref_chosen, atol=1e-2)


@pytest.mark.parametrize("share_prompts", [False, True])
def test_padding_free_rows_give_the_padded_rows_log_probs_and_lengths(tiny_tokenizer, prefs, share_prompts):
    comparisons, model = comparisons_and_lora_policy(tiny_tokenizer, prefs)
    padded = collate_comparisons(comparisons, tiny_tokenizer.pad_token_id)
    packed = collate_comparisons(comparisons, tiny_tokenizer.pad_token_id, pack_to=256, share_prompts=share_prompts)
    assert packed.batch.input_ids.shape[0] < padded.batch.input_ids.shape[0] and packed.n_tokens == padded.n_tokens
    # A pair's prompt once instead of twice: fewer positions than tokens (the unit of throughput stays the same).
    assert (packed.batch.input_ids.numel() < 0.8 * packed.n_tokens) == share_prompts
    a, b = (pair_logps(model, cb, "lora-base", needs_reference=True) for cb in (padded, packed))
    for field in ("chosen", "rejected", "chosen_len", "rejected_len", "ref_chosen", "ref_rejected"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=1e-4, rtol=1e-5)


def test_padding_free_pairs_turn_themselves_off_where_attention_would_leak(tmp_path, prefs, monkeypatch, capsys):
    monkeypatch.setattr(TokenLogprobModel, "keeps_packed_sequences_apart", lambda self, shared_prompts=False: False)
    run_dpo(config(tmp_path, prefs, max_steps=1))
    assert "padding-free batches off" in capsys.readouterr().out


def test_shared_prompts_train_exactly_like_separate_rows_and_turn_off_without_a_mask(tmp_path, prefs, monkeypatch, capsys):
    run_dpo(config(tmp_path, prefs, output=str(tmp_path / "shared"), max_steps=3, eval_fraction=0.0))
    # A model whose attention does not take the shared-prompt mask packs each response whole.
    monkeypatch.setattr(TokenLogprobModel, "keeps_packed_sequences_apart", lambda self, shared_prompts=False: not shared_prompts)
    run_dpo(config(tmp_path, prefs, output=str(tmp_path / "separate"), max_steps=3, eval_fraction=0.0))
    assert "shared prompts off" in capsys.readouterr().out
    shared, separate = read_metrics(tmp_path / "shared"), read_metrics(tmp_path / "separate")
    assert [m["loss"] for m in shared] == pytest.approx([m["loss"] for m in separate], rel=1e-4)
    assert [m["tokens"] for m in shared] == [m["tokens"] for m in separate]


def test_lora_base_reference_trains(tmp_path, prefs):
    summary = run_dpo(config(tmp_path, prefs, lora_r=8, reference="lora-base", lr=2e-2))
    assert summary["eval_after"]["accuracy"] >= 0.9
    assert not (tmp_path / "out" / "reference_logps.pt").exists()


def test_rankings_are_expanded_into_pairs(tmp_path):
    data = write_jsonl(tmp_path / "rank.jsonl", [{"prompt": f"q{i}", "responses": ["great answer", "ok answer", "bad"]} for i in range(10)])
    summary = run_dpo(config(tmp_path, data, max_steps=2, eval_fraction=0.0))
    assert summary["train_pairs"] == 30


def test_bad_preference_files_are_clear_errors(tmp_path):
    identical = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "x", "rejected": "x"}])
    result = run_cli("dpo", "--model", TINY_LLAMA, "--data", str(identical), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and f"{identical}:2" in result.stderr and "identical" in result.stderr
    short = write_jsonl(tmp_path / "rank.jsonl", [{"prompt": "p", "responses": ["only"]}])
    result = run_cli("dpo", "--model", TINY_LLAMA, "--data", str(short), "--output", str(tmp_path / "o2"))
    assert result.returncode == 2 and f"{short}:1" in result.stderr and "at least two" in result.stderr
    result = run_cli("dpo", "--model", TINY_LLAMA, "--data", str(identical), "--output", str(tmp_path / "o3"), "--reference", "lora-base")
    assert result.returncode == 2 and "--lora-r" in result.stderr


@pytest.mark.slow
def test_dpo_on_the_built_in_model_raises_held_out_preference_accuracy(tmp_path):
    held_out = builtin_rows("alpacaeval-prefs-test")[:32]
    eval_file = write_jsonl(tmp_path / "eval.jsonl", held_out)
    summary = run_dpo(
        DPOConfig(
            model=SMOLLM2, data="builtin:alpacaeval-prefs", limit=40,
            eval_data=str(eval_file), output=str(tmp_path / "out"), lora_r=8, lora_alpha=16,
            max_steps=10, batch_size=4, lr=5e-4, beta=0.1, max_length=128, warmup_ratio=0.0, progress=False,
        )  # fmt: skip
    )
    before, after = summary["eval_before"]["accuracy"], summary["eval_after"]["accuracy"]
    print(f"built-in DPO: held-out implicit-reward accuracy {before:.3f} -> {after:.3f}")
    assert after > before


# --- on-policy DPO (--prompts) ---------------------------------------------------------------------------------


def test_onpolicy_pairs_take_the_best_and_the_worst_and_break_ties_by_first_index():
    rows = [
        # best 0.9 at index 1 and 3 -> the first (1); worst 0.1 at index 0 and 2 -> the first (0)
        {"prompt": "p1", "completions": ["a", "b", "c", "d"], "scores": [0.1, 0.9, 0.1, 0.9]},
        # every score equal: nothing to prefer, no pair
        {"prompt": "p2", "completions": ["a", "b", "c"], "scores": [0.5, 0.5, 0.5]},
        # the blank completion would be the worst, but a pair file cannot hold it: the worst of the rest
        {"prompt": [{"role": "user", "content": "p3"}], "completions": [" ", "x", "y"], "scores": [0.0, 2.0, 1.0]},
        # only one non-blank completion left: no pair
        {"prompt": "p4", "completions": ["", "z"], "scores": [0.0, 1.0]},
    ]
    assert onpolicy_pairs(rows) == [
        {"prompt": "p1", "chosen": "b", "rejected": "a", "chosen_score": 0.9, "rejected_score": 0.1},
        {"prompt": [{"role": "user", "content": "p3"}], "chosen": "x", "rejected": "y", "chosen_score": 2.0, "rejected_score": 1.0},
    ]


def test_onpolicy_dpo_samples_pairs_from_the_model_then_trains_on_them(tmp_path, e_reward, capsys):
    cfg = DPOConfig(model=TINY_LLAMA, prompts="builtin:ifeval-train", prompt_limit=8, num_samples=4, scorer=e_reward,
                    sample_max_new_tokens=12, output=str(tmp_path / "out"), max_steps=2, batch_size=2, lr=1e-3,
                    max_length=1024, progress=False)  # fmt: skip
    cfg.validate()
    summary = run_dpo(cfg)
    pairs_file = tmp_path / "out" / "onpolicy_pairs.jsonl"
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    # random text has a varying share of 'e': most of the 8 prompts give a pair
    assert 0 < len(pairs) <= 8 and summary["train_pairs"] == len(pairs)
    assert all(set(p) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"} for p in pairs)
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    for p in pairs:  # the scores are the scorer's
        assert p["chosen_score"] == pytest.approx(p["chosen"].count("e") / len(p["chosen"]))
    assert f"on-policy pairs: {len(pairs)} of 8 prompts gave a pair" in capsys.readouterr().out
    assert len(read_metrics(tmp_path / "out")) == 2 and (tmp_path / "out" / "model").exists()
    # a rerun reuses the pairs instead of sampling again
    stamp = pairs_file.stat().st_mtime_ns
    run_dpo(cfg)
    assert pairs_file.stat().st_mtime_ns == stamp and "reusing" in capsys.readouterr().out


def test_onpolicy_options_are_clear_errors(tmp_path, prefs, e_reward):
    base = ["dpo", "--model", TINY_LLAMA, "--output", str(tmp_path / "o"), "--prompts", "builtin:ifeval-train"]
    for extra, message in [
        (["--data", str(prefs), "--scorer", e_reward], "give --data (pairs you have) or --prompts"),
        ([], "--prompts needs a --scorer"),
        (["--scorer", e_reward, "--num-samples", "1"], "'--num-samples' must be ≥ 2"),
    ]:
        result = run_cli(*base, *extra)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
