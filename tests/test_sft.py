"""SFT smoke runs on the tiny model (seconds each), and one real run on the built-in model."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.algorithms.sft import SFTConfig, run_sft
from alignkit.errors import AlignkitError
from alignkit.logprobs import TokenLogprobModel, keeps_packed_sequences_apart
from alignkit.models import SMOLLM2, TINY_LLAMA, load_model
from conftest import SFT_DATA, read_metrics, write_jsonl


def tiny_config(tmp_path, **overrides) -> SFTConfig:
    settings = dict(
        model=TINY_LLAMA, data=str(SFT_DATA), output=str(tmp_path / "out"), max_steps=25, batch_size=8,
        max_length=128, lr=3e-3, eval_fraction=0.05, progress=False,
    )  # fmt: skip
    settings.update(overrides)
    config = SFTConfig(**settings)
    config.validate()
    return config


def test_full_fine_tuning_lowers_held_out_loss_and_saves_a_plain_transformers_model(tmp_path):
    summary = run_sft(tiny_config(tmp_path))
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1
    metrics = read_metrics(tmp_path / "out")
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(metrics[0])
    assert [m["step"] for m in metrics] == list(range(1, 26))
    model_dir = tmp_path / "out" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert (model_dir / "model.safetensors").exists()
    assert model.num_parameters() == summary["parameters"]


def test_lora_trains_only_adapters_and_saves_merged_model_and_adapter(tmp_path):
    summary = run_sft(tiny_config(tmp_path, lora_r=8, lora_alpha=16, lr=1e-2))
    assert summary["trainable_parameters"] < summary["parameters"] / 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_packing_fills_rows_with_several_examples_and_still_learns(tmp_path):
    data = write_jsonl(tmp_path / "short.jsonl", [{"instruction": f"Repeat the number {i}.", "output": f"{i}"} for i in range(300)])
    plain = run_sft(tiny_config(tmp_path / "a", data=str(data), max_steps=10, max_length=256))
    packed = run_sft(tiny_config(tmp_path / "b", data=str(data), max_steps=10, max_length=256, packing=True))
    # The same number of rows per step carries several times more real tokens when packed.
    assert read_metrics(tmp_path / "b" / "out")[-1]["tokens"] > 3 * read_metrics(tmp_path / "a" / "out")[-1]["tokens"]
    assert packed["eval_loss_after"] < packed["eval_loss_before"]
    assert plain["eval_loss_after"] < plain["eval_loss_before"]


def test_padding_free_rows_train_exactly_like_padded_ones(tmp_path):
    """The same examples per step, laid end to end instead of padded: the same losses, far fewer positions."""
    common = dict(max_steps=4, batch_size=4, max_length=96, eval_fraction=0.0)
    run_sft(tiny_config(tmp_path / "free", **common))
    run_sft(tiny_config(tmp_path / "padded", padding_free=False, **common))
    free, padded = read_metrics(tmp_path / "free" / "out"), read_metrics(tmp_path / "padded" / "out")
    assert [m["loss"] for m in free] == pytest.approx([m["loss"] for m in padded], rel=1e-4)
    assert [m["tokens"] for m in free] == [m["tokens"] for m in padded]


def test_padding_free_turns_itself_off_where_attention_would_leak_across_sequences(tmp_path, monkeypatch, capsys):
    model = TokenLogprobModel(load_model(TINY_LLAMA))
    decoder = model.model.get_decoder()
    assert model.keeps_packed_sequences_apart()
    # A backbone that ignores position ids builds a plain causal mask over the row: sequences would leak.
    assert not keeps_packed_sequences_apart(model, lambda position_ids=None, **kwargs: decoder(**kwargs))
    monkeypatch.setattr(TokenLogprobModel, "keeps_packed_sequences_apart", lambda self: False)
    run_sft(tiny_config(tmp_path, max_steps=1, eval_fraction=0.0))
    assert "padding-free batches off" in capsys.readouterr().out
    with pytest.raises(AlignkitError, match="--packing: the attention of"):
        run_sft(tiny_config(tmp_path / "packed", max_steps=1, eval_fraction=0.0, packing=True))


def test_mid_training_mixes_instructions_only_in_the_decay_phase(tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 20}] * 30)
    summary = run_sft(tiny_config(tmp_path, mix_data=str(text), mix_ratio=1.0, scheduler="wsd", decay_ratio=0.4, max_steps=10))
    metrics = read_metrics(tmp_path / "out")
    step_tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + metrics, metrics)]
    masked = [tokens - m["units"] for tokens, m in zip(step_tokens, metrics)]
    # A text window trains on every token but its last; an instruction row masks its whole prompt.
    assert masked[:6] == [8] * 6  # stable phase: 8 text windows per step
    assert all(n > 8 * 10 for n in masked[6:])  # decay phase with ratio 1: instruction rows only
    assert summary["steps"] == 10


def test_yaml_config_with_flag_override(tmp_path):
    from alignkit.cli import main

    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {TINY_LLAMA}\ndata: {SFT_DATA}\nmax_steps: 50\nbatch_size: 2\nmax_length: 64\nprogress: false\n")
    assert main(["sft", "--config", str(config), "--max-steps", "3", "--output", str(tmp_path / "o")]) == 0
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["config"]["max_steps"] == 3 and run["config"]["batch_size"] == 2


@pytest.mark.slow
def test_sft_on_the_built_in_model_lowers_held_out_loss(tmp_path):
    summary = run_sft(
        SFTConfig(
            model=SMOLLM2, data=str(SFT_DATA), output=str(tmp_path / "out"), max_steps=8, batch_size=4, max_length=128,
            lr=3e-5, warmup_ratio=0.0, eval_fraction=0.02, progress=False,
        )  # fmt: skip
    )
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    print(f"built-in SFT: held-out loss {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}, "
          f"{summary['tokens_per_s']:.0f} tokens/s, peak {summary['peak_memory_mb']:.0f} MiB")
