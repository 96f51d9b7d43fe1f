"""Reward models: pooling, packed batches against padded ones, the K-way loss by hand, calibration by hand, training/normalisation/scoring on the
tiny model, combined rewards on fake scorers, CLI errors, and one real run on the built-in model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from alignkit.algorithms.rm import (
    RMConfig,
    RMLoss,
    collate_for_rm,
    evaluate_records,
    preference_metrics,
    run_rm,
)
from alignkit.cli import main
from alignkit.data.comparisons import encode_comparisons
from alignkit.data.loading import load_records
from alignkit.data.records import Message, PreferencePair, Ranking, user_prompt
from alignkit.data.tokenize import IGNORE, collate, collate_packed, encode_prompt_completion, shared_prompt_length
from alignkit.evaluation.metrics import expected_calibration_error
from alignkit.models import SMOLLM2, TINY_LLAMA, load_model
from alignkit.rewards.reward_model import CombinedReward, RewardModel, build_reward_model, load_reward_model
from conftest import ROOT, builtin_rows, read_metrics, write_jsonl

TOPICS = ["cats", "rivers", "music", "tea", "trains", "stars", "bread", "rain", "chess", "maps", "boats", "owls"]


def synthetic_pairs(start: int, stop: int) -> list[dict]:
    """Learnable preferences: a polite, complete answer beats a curt one, whatever the topic."""
    rows = []
    for i in range(start, stop):
        topic = TOPICS[(i * 7) % len(TOPICS)]
        rows.append({
            "prompt": f"Tell me something about {topic}, please ({i}).",
            "chosen": f"Thank you for asking! Here is a careful and kind answer about {topic}.",
            "rejected": f"no. {topic}. whatever.",
        })  # fmt: skip
    return rows


def bt(x: float) -> float:
    """−log σ(x) by hand."""
    return math.log1p(math.exp(-x))


# --- (a) pooling ------------------------------------------------------------------------------------------


def test_last_token_pooling_ignores_right_padding(tiny_tokenizer):
    torch.manual_seed(0)
    rm = RewardModel(load_model(TINY_LLAMA), tiny_tokenizer).eval()
    texts = ["A short answer.", "A much longer answer that needs many more tokens than the first one does."]
    examples = rm.encode([user_prompt("Hi")] * 2, texts)
    assert len(examples[0]) < len(examples[1])
    batch = collate([[e] for e in examples], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        padded = rm(batch.input_ids, batch.attention_mask, batch.position_ids)
        alone = [rm(torch.tensor([e.input_ids])).item() for e in examples]
        # The reward is read at the last real token, not at the padding in the last column.
        last_column = rm.head(rm.body()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[0, -1])
    assert padded.tolist() == pytest.approx(alone, abs=1e-5)
    assert abs(last_column.item() - alone[0]) > 1e-4


def test_an_untied_lm_head_is_frozen_since_it_never_reaches_the_reward():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=False)
    rm = RewardModel(LlamaForCausalLM(config))
    assert not rm.model.lm_head.weight.requires_grad
    assert rm.head.weight.requires_grad and rm.model.model.embed_tokens.weight.requires_grad
    assert rm(torch.tensor([[1, 2, 3]])).shape == (1,)


# --- packed batches ---------------------------------------------------------------------------------------


def tiny_rm(tokenizer, attention: str = "sdpa") -> RewardModel:
    torch.manual_seed(0)
    model = load_model(TINY_LLAMA)
    model.set_attn_implementation(attention)
    return RewardModel(model, tokenizer)


def mixed_comparisons(tokenizer):
    """A 3-way ranking and two pairs whose answers differ in length, so padded rows carry much padding."""
    records = [
        Ranking(user_prompt("Rank these."), ("a long and careful answer with many words in it", "fine", "a middling answer")),
        PreferencePair(user_prompt("Pick one."), "yes", "no, and here is a much longer explanation of why not", margin=0.5),
        PreferencePair(user_prompt("Another question, a longer one this time?"), "short", "shorter"),
    ]
    return encode_comparisons(tokenizer, records, max_length=256)[0]


@pytest.mark.parametrize("share_prompts", [False, True])
@pytest.mark.parametrize("attention, budget", [("sdpa", 1024), ("eager", 1024), ("sdpa", 160)])
def test_packed_batches_give_the_padded_rewards_loss_and_gradients(tiny_tokenizer, attention, budget, share_prompts):
    rm = tiny_rm(tiny_tokenizer, attention)
    comparisons = mixed_comparisons(tiny_tokenizer)
    assert rm.packs() and rm.shares_prompts()
    padded = collate_for_rm(comparisons, tiny_tokenizer.pad_token_id, use_margins=True)
    packed = collate_for_rm(comparisons, tiny_tokenizer.pad_token_id, use_margins=True, pack_to=budget, share_prompts=share_prompts)
    assert packed.n_tokens == padded.n_tokens
    # With shared prompts a comparison's prompt is in the row once. Labels start at the prompt's last token (it
    # predicts the answer's first); the tokens before it are the shared part, not computed again for the others.
    prompts = [next(i for i, label in enumerate(c.responses[0].labels) if label != IGNORE) for c in comparisons]
    saved = sum((len(c.responses) - 1) * n for c, n in zip(comparisons, prompts)) if share_prompts else 0
    assert [shared_prompt_length(c.responses) for c in comparisons] == prompts and min(prompts) > 0
    assert (packed.batch.attention_mask is None) != share_prompts
    if budget > packed.n_tokens:  # one row, not a single padding token
        assert packed.batch.input_ids.shape == (1, packed.n_tokens - saved)
    else:  # several rows up to the budget, the shorter ones padded (as a block of their own)
        assert 1 < packed.batch.input_ids.shape[0] < padded.batch.input_ids.shape[0]
        assert packed.batch.input_ids.shape[1] <= budget

    results = []
    for batch in (padded, packed):
        rm.zero_grad()
        rows = batch.batch
        rewards = rm(rows.input_ids, rows.attention_mask, rows.position_ids, rows.ends)
        loss, metrics = RMLoss()(rm, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in rm.named_parameters() if p.grad is not None}
        results.append((rewards.detach(), loss.item(), metrics["accuracy"].item(), grads))
    (r_pad, loss_pad, acc_pad, g_pad), (r_pack, loss_pack, acc_pack, g_pack) = results
    assert r_pack.tolist() == pytest.approx(r_pad.tolist(), abs=1e-5)
    assert loss_pack == pytest.approx(loss_pad, abs=1e-6) and acc_pack == acc_pad
    assert g_pack.keys() == g_pad.keys() and len(g_pad) > 2
    for name, grad in g_pad.items():
        torch.testing.assert_close(g_pack[name], grad, atol=1e-5, rtol=1e-4, msg=name)

    # Scoring packs too (when the budget leaves room) and gives the padded scores.
    answers = [r for c in comparisons for r in c.responses]
    rm.batch_size = len(answers)
    scored_packed = rm.rewards_of(answers, normalised=False)
    rm.packing = False
    assert scored_packed.tolist() == pytest.approx(rm.rewards_of(answers, normalised=False).tolist(), abs=1e-5)
    assert scored_packed.tolist() == pytest.approx(r_pad.tolist(), abs=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_sequences_do_not_see_each_other(tiny_tokenizer, attention):
    rm = tiny_rm(tiny_tokenizer, attention).eval()
    examples = rm.encode([user_prompt("Hi")] * 2, ["The first answer.", "The second answer, a bit longer."])
    changed = rm.encode([user_prompt("Yo")], ["Another first reply."])[0]
    assert len(changed) == len(examples[0])  # the same row layout, different tokens before sequence 2

    def rewards(first):
        batch = collate_packed([first, examples[1]], 256, tiny_tokenizer.pad_token_id)
        assert batch.input_ids.shape[0] == 1 and batch.attention_mask is None
        with torch.no_grad():
            return rm(batch.input_ids, None, batch.position_ids, batch.ends).tolist()

    before, after = rewards(examples[0]), rewards(changed)
    assert after[1] == pytest.approx(before[1], abs=1e-6)  # sequence 2 never attends to sequence 1
    assert abs(after[0] - before[0]) > 1e-4  # while sequence 1's own reward does change
    with torch.no_grad():
        alone = rm(torch.tensor([examples[1].input_ids])).item()
    assert before[1] == pytest.approx(alone, abs=1e-5)  # and its positions restart at 0


def test_packing_turns_itself_off_where_it_cannot_be_right(tiny_tokenizer, monkeypatch):
    rm = tiny_rm(tiny_tokenizer)
    body = rm.body()

    # A backbone that ignores position ids builds a plain causal mask over the row: sequences would leak.
    def leaky_body():
        return lambda position_ids=None, **kwargs: body(**kwargs)

    monkeypatch.setattr(rm, "body", leaky_body)
    assert not rm.packs()
    assert not RewardModel(load_model(TINY_LLAMA), tiny_tokenizer, packing=False).packs()
    assert not RewardModel(load_model(TINY_LLAMA), tiny_tokenizer, pooling="mean").packs()


# --- (b) the K-way loss by hand ---------------------------------------------------------------------------


class FixedRewards(torch.nn.Module):
    """A stand-in reward model that returns given rewards for the rows of a batch."""

    def __init__(self, rewards: list[float]):
        super().__init__()
        self.rewards = torch.tensor(rewards, requires_grad=True)
        self.rows = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, ends=None):
        self.rows = input_ids.shape[0]
        return self.rewards


def test_ranking_loss_averages_all_pairs_and_encodes_each_answer_once(tiny_tokenizer):
    prompt = user_prompt("Rank these.")
    ranking = Ranking(prompt, ("best answer", "good answer", "fair answer", "worst answer"))
    pair = PreferencePair(user_prompt("Pick one."), "yes", "no", margin=0.5)
    comparisons, _ = encode_comparisons(tiny_tokenizer, [ranking, pair], max_length=256)
    batch = collate_for_rm(comparisons, tiny_tokenizer.pad_token_id, use_margins=True)  # padded: pack_to=0
    # Each answer is one row, once, best first: 4 + 2 rows for 6 + 1 pairs.
    expected_rows = [encode_prompt_completion(tiny_tokenizer, prompt, r).input_ids for r in ranking.responses]
    expected_rows += [encode_prompt_completion(tiny_tokenizer, pair.prompt, r).input_ids for r in ("yes", "no")]
    assert batch.batch.input_ids.shape[0] == 6
    for row, ids, mask in zip(batch.batch.input_ids.tolist(), expected_rows, batch.batch.attention_mask.tolist()):
        assert row[: sum(mask)] == ids

    r = [2.0, 1.0, 0.5, -1.0, 0.3, 0.8]
    model = FixedRewards(r)
    loss, metrics = RMLoss()(model, batch)
    ranking_pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    by_hand = sum(bt(r[i] - r[j]) for i, j in ranking_pairs) / 6 + bt(r[4] - r[5] - 0.5)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert RMLoss().units(batch) == 2
    assert model.rows == 6
    assert metrics["accuracy"].item() == pytest.approx(1.0 + 0.0)  # ranking fully right, pair wrong
    assert metrics["margin"].item() == pytest.approx(sum(r[i] - r[j] for i, j in ranking_pairs) / 6 + (r[4] - r[5]))
    assert metrics["reward_mean"].item() == pytest.approx(sum(r[:4]) / 4 + sum(r[4:]) / 2)
    assert metrics["reward_std"].item() == pytest.approx(torch.tensor(r).std(unbiased=False).item() * 2, rel=1e-6)
    # Without margins the pair's term is plain Bradley-Terry.
    loss_plain, _ = RMLoss(use_margins=False)(model, batch)
    assert loss_plain.item() == pytest.approx(sum(bt(r[i] - r[j]) for i, j in ranking_pairs) / 6 + bt(r[4] - r[5]), rel=1e-6)


def test_a_batch_where_only_some_pairs_have_a_margin_gives_the_others_zero(tiny_tokenizer):
    pairs = [PreferencePair(user_prompt("a"), "yes", "no", margin=1.0), PreferencePair(user_prompt("b"), "yes", "no")]
    comparisons, _ = encode_comparisons(tiny_tokenizer, pairs, max_length=256)
    assert collate_for_rm(comparisons, 0, use_margins=True).margins.tolist() == [1.0, 0.0]
    assert collate_for_rm(comparisons, 0, use_margins=False).margins is None


# --- (e) calibration by hand ------------------------------------------------------------------------------


def test_expected_calibration_error_by_hand():
    confidence = torch.tensor([0.55, 0.58, 0.95, 0.92, 0.75])
    correct = torch.tensor([1, 0, 1, 1, 0])
    # bin 5: acc 0.5, conf 0.565; bin 9: acc 1, conf 0.935; bin 7: acc 0, conf 0.75
    by_hand = 2 / 5 * 0.065 + 2 / 5 * 0.065 + 1 / 5 * 0.75
    assert expected_calibration_error(confidence, correct) == pytest.approx(by_hand)
    assert expected_calibration_error(torch.tensor([1.0]), torch.tensor([1])) == pytest.approx(0.0)


def test_preference_metrics_by_hand():
    metrics = preference_metrics(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    s2, s1 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))
    # Pair 1: predicted winner right with confidence σ(2); pair 2: wrong with confidence σ(1), other bins.
    assert metrics["ece"] == pytest.approx(0.5 * (1 - s2) + 0.5 * s1)
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == pytest.approx(0.5) and metrics["pairs"] == 2
    assert metrics["loss"] == pytest.approx((bt(2.0) + bt(-1.0)) / 2)


# --- (c), (d), (f) training, normalisation, scoring on the tiny model -------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run on synthetic preferences, shared by the tests that read its output."""
    root = tmp_path_factory.mktemp("rm")
    train_file = write_jsonl(root / "train.jsonl", synthetic_pairs(0, 160))
    test_file = write_jsonl(root / "test.jsonl", synthetic_pairs(1000, 1040))
    config = RMConfig(
        model=TINY_LLAMA, data=str(train_file), eval_data=str(test_file), output=str(root / "out"), max_steps=25,
        batch_size=8, max_length=128, lr=3e-3, progress=False,
    )  # fmt: skip
    config.validate()
    return config, run_rm(config)


def test_training_on_learnable_preferences_reaches_high_held_out_accuracy(trained):
    config, summary = trained
    assert summary["eval"]["accuracy"] >= 0.9, summary["eval"]
    metrics = read_metrics(Path(config.output))
    assert [m["step"] for m in metrics] == list(range(1, 26))
    assert {"loss", "accuracy", "margin", "reward_mean", "reward_std"} <= set(metrics[0])
    assert all(m["units"] == 8 for m in metrics)  # one unit per comparison
    assert metrics[-1]["loss"] < metrics[0]["loss"] and metrics[-1]["accuracy"] >= 0.9
    model_dir = Path(config.output) / "model"
    assert {"reward_head.safetensors", "reward_model.json", "model.safetensors", "config.json"} <= {p.name for p in model_dir.iterdir()}


def test_normalisation_gives_mean_zero_std_one_on_the_reference_set_after_reload(trained):
    config, summary = trained
    rm = load_reward_model(config.output)
    assert summary["normalisation"]["source"] == "held-out" and summary["normalisation"]["responses"] == 80
    records, _ = load_records(config.eval_data, "comparison")
    prompts = [r.prompt for r in records for _ in range(2)]
    answers = [text for r in records for text in (r.chosen, r.rejected)]
    scores = rm.score(prompts, answers)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    # The saved model scores the held-out pairs exactly as the model did at the end of training.
    assert evaluate_records(rm, records)["margin"] == pytest.approx(summary["eval"]["margin"], rel=1e-4)


def test_score_adds_rewards_to_completion_rows_and_generate_output(trained, tmp_path):
    config, _ = trained
    polite = "Thank you for asking! Here is a careful and kind answer about owls."
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "Tell me something about owls, please.", "completions": [polite, "no. owls. whatever.", ""], "finished": [True, True, False]},
        {"prompt": "Tell me something about owls, please.", "completion": "no. owls. whatever."},
        {"messages": [{"role": "user", "content": "Tell me something about tea, please."}, {"role": "assistant", "content": polite}]},
    ])  # fmt: skip
    out = tmp_path / "scored.jsonl"
    assert main(["rm", "--action", "score", "--model", config.output, "--data", str(rows), "--output", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored[0]["rewards"]) == 3 and scored[0]["finished"] == [True, True, False]
    assert isinstance(scored[1]["reward"], float) and isinstance(scored[2]["reward"], float)
    assert scored[0]["rewards"][0] > scored[0]["rewards"][1]
    assert scored[1]["reward"] == pytest.approx(scored[0]["rewards"][1], abs=1e-5)
    expected = load_reward_model(config.output).score([user_prompt("Tell me something about tea, please.")], [polite])
    assert scored[2]["reward"] == pytest.approx(expected.item(), abs=1e-5)


def test_a_trained_reward_model_is_a_reward_for_online_rl(trained):
    from alignkit.rewards.verifiers import build_scorer

    config, _ = trained
    prompts, answers = [user_prompt("Tell me something about rain, please.")] * 2, ["Thank you for asking! Rain.", "no."]
    via_spec = build_scorer(f"rm:{config.output}*2").score(prompts, answers, ["", ""])
    assert via_spec.tolist() == pytest.approx((2 * load_reward_model(config.output).score(prompts, answers)).tolist(), abs=1e-5)


def test_eval_command_reports_accuracy_margin_and_calibration(trained, tmp_path, capsys):
    config, summary = trained
    assert main(["rm", "--action", "eval", "--model", config.output, "--data", config.eval_data, "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "rm_eval.json").read_text())
    assert report["pairs"] == 40 and report["accuracy"] == pytest.approx(summary["eval"]["accuracy"])
    assert 0 <= report["ece"] <= 1 and "accuracy" in capsys.readouterr().out


def test_lora_trains_adapters_and_head_and_reloads_merged(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(0, 48))
    test_file = write_jsonl(tmp_path / "test.jsonl", synthetic_pairs(1000, 1016))
    config = RMConfig(
        model=TINY_LLAMA, data=str(train_file), eval_data=str(test_file), output=str(tmp_path / "out"), max_steps=6,
        batch_size=8, max_length=128, lr=1e-2, lora_r=4, progress=False,
    )  # fmt: skip
    summary = run_rm(config)
    assert summary["trainable_parameters"] < summary["parameters"] / 4
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    rm = load_reward_model(tmp_path / "out")
    assert not any("lora" in name for name, _ in rm.named_parameters())
    # The merged backbone plus the saved head give the rewards the adapter-wrapped model gave in training.
    records, _ = load_records(str(test_file), "comparison")
    assert evaluate_records(rm, records)["margin"] == pytest.approx(summary["eval"]["margin"], rel=1e-4, abs=1e-5)


def test_encoder_backbone_trains_saves_and_scores(tmp_path, tiny_tokenizer):
    encoder_dir = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    BertModel(config).save_pretrained(encoder_dir)
    tiny_tokenizer.save_pretrained(encoder_dir)
    train_file = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(0, 96))
    test_file = write_jsonl(tmp_path / "test.jsonl", synthetic_pairs(1000, 1024))
    summary = run_rm(RMConfig(
        model=str(encoder_dir), backbone="encoder", data=str(train_file), eval_data=str(test_file),
        output=str(tmp_path / "out"), max_steps=15, batch_size=8, max_length=128, lr=3e-3, progress=False,
    ))  # fmt: skip
    assert summary["eval"]["accuracy"] >= 0.9
    rm = load_reward_model(tmp_path / "out")
    assert rm.backbone == "encoder" and rm.pooling == "cls"
    example = rm.encode([user_prompt("x")], ["y"])[0]
    assert example.input_ids[0] == tiny_tokenizer.bos_token_id and example.input_ids[-1] == tiny_tokenizer.eos_token_id


# --- (g) several reward models combined -------------------------------------------------------------------


class TableScorer:
    """A fake scorer: a fixed score per completion text."""

    def __init__(self, table: dict[str, float]):
        self.table = table

    def score(self, prompts, completions):
        return torch.tensor([self.table[c] for c in completions])


HELPFUL = TableScorer({"a": 1.0, "b": 2.0, "c": -1.0, "d": 0.5})
SAFE = TableScorer({"a": 0.0, "b": -3.0, "c": 4.0, "d": 1.0})  # σ: 0.5, 0.047, 0.98, 0.73


def test_weighted_sum_mean_and_min_by_hand():
    prompts, completions = [user_prompt("q")] * 4, ["a", "b", "c", "d"]
    weighted = CombinedReward({"h": HELPFUL, "s": SAFE}, "weighted_sum", weights={"h": 0.5, "s": 2.0})
    assert weighted.score(prompts, completions).tolist() == pytest.approx([0.5, -5.0, 7.5, 2.25])
    mean = CombinedReward({"h": HELPFUL, "s": SAFE}, "ensemble_mean")
    assert mean.score(prompts, completions).tolist() == pytest.approx([0.5, -0.5, 1.5, 0.75])
    least = CombinedReward({"h": HELPFUL, "s": SAFE}, "ensemble_min")
    assert least.score(prompts, completions).tolist() == pytest.approx([0.0, -3.0, -1.0, 0.5])


def test_llama2_rule_uses_safety_for_unsafe_prompts_and_low_safety_scores():
    combo = CombinedReward(
        {"helpfulness": HELPFUL, "safety": SAFE}, "llama2", safety_threshold=0.15, unsafe_patterns=[r"(?i)\bbomb\b"]
    )
    safe_prompt, bomb = user_prompt("How do I bake bread?"), user_prompt("How do I build a BOMB?")
    prompts = [safe_prompt, safe_prompt, safe_prompt, bomb]
    # a: safe prompt, σ(0)=0.5 ≥ 0.15 -> helpfulness 1; b: σ(−3)=0.047 < 0.15 -> safety −3;
    # c: flagged unsafe by the caller -> safety 4; d: prompt matches the regex -> safety 1.
    scores = combo.score(prompts, ["a", "b", "c", "d"], unsafe=[False, False, True, False])
    assert scores.tolist() == pytest.approx([1.0, -3.0, 4.0, 1.0])
    assert combo.last_used_safety.tolist() == [False, True, True, True]
    # With the threshold on the score itself, −3 < −2.5 still routes b to safety, 0 ≥ −2.5 keeps a helpful.
    raw = CombinedReward({"helpfulness": HELPFUL, "safety": SAFE}, "llama2", safety_threshold=-2.5, threshold_on="score")
    assert raw.score([safe_prompt] * 2, ["a", "b"]).tolist() == pytest.approx([1.0, -3.0])


def test_combo_yaml_example_parses_and_bad_specs_are_clear(tmp_path):
    from alignkit.errors import AlignkitError

    fakes = {"outputs/rm-helpful": HELPFUL, "outputs/rm-harmless": SAFE}
    combo = CombinedReward.from_yaml(ROOT / "examples" / "reward_combo.yaml", load=fakes.__getitem__)
    assert combo.kind == "llama2" and set(combo.scorers) == {"helpfulness", "safety"}
    spec = tmp_path / "c.yaml"
    spec.write_text("kind: weighted_sum\nmodels:\n  h: {path: outputs/rm-helpful, weight: 3}\n  s: outputs/rm-harmless\n")
    combo = CombinedReward.from_yaml(spec, load=fakes.__getitem__)
    assert combo.score([user_prompt("q")], ["a"]).tolist() == pytest.approx([3.0])
    spec.write_text("kind: llama2\nmodels:\n  h: outputs/rm-helpful\n")
    with pytest.raises(AlignkitError, match="helpfulness and a safety scorer"):
        CombinedReward.from_yaml(spec, load=fakes.__getitem__)
    spec.write_text("kind: best\nmodels:\n  h: outputs/rm-helpful\n")
    with pytest.raises(AlignkitError, match="unknown combination kind"):
        CombinedReward.from_yaml(spec, load=fakes.__getitem__)


def test_the_reward_model_and_combinations_share_the_scorer_interface(tiny_tokenizer):
    from alignkit.rewards.scorer import Scorer, guard

    rm = build_reward_model(TINY_LLAMA)
    assert isinstance(rm, Scorer) and isinstance(CombinedReward({"h": HELPFUL}), Scorer)
    prompts = [user_prompt("q"), (Message("system", "be brief"), Message("user", "q"))]
    assert rm.score(prompts, ["a", "b"]).shape == (2,)
    assert rm.score(prompts, ["a", "b"], ["ref", "ref"]).tolist() == rm.score(prompts, ["a", "b"]).tolist()
    assert guard(rm).score(prompts, ["a", "b"]).dtype == torch.float32  # the verifiers' output checks accept it


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_row, needle",
    [
        ('{"prompt": "p", "responses": ["only one"]}', "at least two answers"),
        ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "identical"),
        ('{"prompt": "p", "chosen": "a", ', "malformed JSON"),
    ],
)
def test_bad_comparison_data_stops_with_file_and_line(tmp_path, capsys, bad_row, needle):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', bad_row])
    code = main(["rm", "--model", TINY_LLAMA, "--data", str(data), "--output", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and f"{data}:2" in err and needle in err


@pytest.mark.parametrize("action", ["eval", "score"])
def test_eval_and_score_refuse_a_model_that_is_not_a_reward_model(tmp_path, capsys, action):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "completion": "a"}])
    code = main(["rm", "--action", action, "--model", TINY_LLAMA, "--data", str(data), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a reward model" in err and "Traceback" not in err


# --- a real run on the built-in model ---------------------------------------------------------------------


@pytest.mark.slow
def test_reward_model_on_the_built_in_model_with_lora_fits_its_alpacaeval_pairs(tmp_path):
    """A real LoRA reward model learns its training pairs. Held-out accuracy after 6 steps on 24 pairs is chance
    (measured 0.50 on 16 pairs), so the claim is about the pairs it trained on, evaluated after training:
    measured 0.79 accuracy and a mean margin of 0.81 (at lr 1e-4, 0.71 and 0.32), from a head whose first
    loss, 1.08, is worse than a coin's 0.69."""
    train_file = write_jsonl(tmp_path / "train.jsonl", builtin_rows("alpacaeval-prefs")[:24])
    summary = run_rm(RMConfig(
        model=SMOLLM2, data=str(train_file), eval_data=str(train_file), output=str(tmp_path / "out"), max_steps=6,
        batch_size=4, max_length=192, lr=3e-4, lora_r=16, lora_alpha=32, warmup_ratio=0.0, progress=False,
    ))  # fmt: skip
    fit = summary["eval"]
    assert fit["pairs"] == 24 and fit["accuracy"] >= 0.65 and fit["margin"] > 0.3, fit
    assert (tmp_path / "out" / "model" / "reward_model.json").exists()
    print(
        f"built-in RM (LoRA, 24 pairs, 6 steps): accuracy {fit['accuracy']:.3f} and margin {fit['margin']:.3f} on its "
        f"training pairs, {summary['tokens_per_s']:.0f} tokens/s, peak {summary['peak_memory_mb']:.0f} MiB"
    )
