"""`alignkit eval`: a model against a baseline on the same prompts, judged by any scorer.

Both models answer every prompt (greedy by default); the scorer (`rm:PATH`, a verifier, `python:...`, a
weighted sum) rates both answers, and each prompt becomes one judgment: 1 win, 0 loss, ½ tie. From those
and the answers themselves come the numbers of `docs/evaluation.md`, all computed by the pure functions in
`evaluation/metrics.py` and `evaluation/diagnostics.py`:

* win rate of the model over the baseline with a percentile-bootstrap 95 % interval (ties count half);
* the length-controlled win rate (logistic fit on the token-length difference, Dubois et al. 2024);
* mean lengths, and the correlation of length with the score over both models' answers (verbosity bias);
* distinct-1/2 and self-BLEU of the model's answers, and both models' refusal rates;
* ``KL(model ‖ baseline)`` on the model's own answers: ``Σ_t log π(y_t) − log π_B(y_t)`` per answer,
  averaged over answers (the k1 estimator; k3 is reported beside it), in nats per sequence;
* optionally the alignment tax: task accuracy of both (`--task-prompts`, `--task-reward`) and held-out
  perplexity of both (`--heldout-data`).

Only one model is in memory at a time: the model is loaded, generates and scores its own answers' log-probs,
then the baseline does the same on the model's token ids. The KL therefore needs both to share a
tokenizer (same vocabulary); when they do not, it is left out and the reason is recorded.

Writes ``OUTPUT/eval.json`` (every number) and ``OUTPUT/samples.jsonl`` (one row per prompt).

With ``--benchmark ifeval`` the benchmark's own rules judge instead (`run_benchmark`, numbers in
`evaluation/ifeval.py`): the model, and optionally a baseline, answer IFEval's prompts (or their answers are read
from ``--responses`` / ``--baseline-responses``), and eval.json holds the paper's four accuracies with bootstrap
intervals, the paired differences, a per-instruction-type table, lengths, cut answers and timing; beside
samples.jsonl it writes ``OUTPUT/responses.jsonl`` in the benchmark's input_response_data format. A baseline
*model* adds the KL above on the model's answers; given with ``--baseline-responses`` it answers nothing and is
loaded only for that KL.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.config import SEEDS, at_least, within
from alignkit.data.loading import load_records
from alignkit.data.records import PromptWithAnswer
from alignkit.data.tokenize import IGNORE, collate, encode_conversations, truncate
from alignkit.errors import AlignkitError
from alignkit.evaluation import ifeval, metrics
from alignkit.evaluation.diagnostics import length_reward_correlation
from alignkit.evaluation.tracking import evaluate_rewards
from alignkit.generation import SamplingParams, Sample, TransformersGenerator, rollout_rows
from alignkit.io import write_jsonl
from alignkit.logprobs import TokenLogprobModel, batch_logprobs, mean_nll
from alignkit.models import evaluating, load_model, load_tokenizer
from alignkit.options import ScorerOptions
from alignkit.rewards.scorer import check_references
from alignkit.rewards.verifiers import build_scorer


BENCHMARKS = ("ifeval",)
"""what --benchmark runs"""


@dataclass
class EvalConfig(ScorerOptions):
    """Options of `alignkit eval`."""

    model: str = ""
    """the model to evaluate: a directory, a hub id, an alignkit output directory, or a built-in alias"""
    baseline: str = ""
    """the model it is compared with (e.g. the model before alignment, or the SFT model); optional with --benchmark"""
    prompts: str = ""
    """prompts both models answer: JSONL/JSON/Parquet with a 'prompt', 'instruction', 'question' or 'messages' field (with --benchmark ifeval: builtin:ifeval unless given, or a file of IFEval rows such as a subset)"""
    judge: str = ""
    """scorer that rates each answer: rm:PATH, python:file.py:function, gsm8k, exact, format:REGEX, or a weighted sum"""
    benchmark: str = ""
    """score by a benchmark's own rules instead of --judge: 'ifeval' (Zhou et al. 2023: 541 prompts with verifiable instructions; prompt- and instruction-level accuracy, strict and loose, with bootstrap CIs)"""
    responses: str = ""
    """with --benchmark: score these answers instead of generating with --model: JSONL of {"prompt", "response"} rows (IFEval's input_response_data), matched to the prompts by their text"""
    baseline_responses: str = ""
    """with --benchmark: the baseline's answers in the same format, instead of generating them; with --baseline too,
    that model answers nothing and only scores the model's answers for the KL"""
    gold_judge: str = ""
    """a second, held-out judge (any scorer spec, e.g. an RM trained on other labels) whose win rate is reported beside the judge's: a policy tuned against the judge can fool it but not this one"""
    output: str = ""
    """directory for eval.json (all numbers) and samples.jsonl (both answers and scores per prompt)"""
    limit: int = at_least(0, 0)
    """use only the first N prompts (0: all)"""
    temperature: float = at_least(0, 0.0)
    """sampling temperature of both models; 0 for greedy decoding"""
    top_p: float = within("(0, 1]", 1.0)
    """nucleus sampling when --temperature > 0"""
    max_new_tokens: int = at_least(1, 256)
    """longest answer in tokens; with --benchmark ifeval give 1280 (lm-evaluation-harness's value), as some prompts ask for 800+ words: a cut answer is scored as it stands and counted in the report"""
    batch_size: int = at_least(1, 8)
    """prompts per generation and log-prob batch"""
    seed: int = within(SEEDS, 0)
    """sampling seed (and the bootstrap's)"""
    tie_tolerance: float = at_least(0, 0.0)
    """score differences up to this count as a tie (half a win)"""
    bootstrap_resamples: int = at_least(1, 2000)
    """resamples of the bootstrap confidence interval of the win rate"""
    task_prompts: str = ""
    """alignment tax: prompts with reference answers (e.g. GSM8K) whose accuracy is measured for both models"""
    task_reward: str = "gsm8k"
    """scorer of --task-prompts answers (1 correct, 0 wrong), e.g. gsm8k or exact"""
    task_limit: int = at_least(0, 0)
    """use only the first N task prompts (0: all)"""
    heldout_data: str = ""
    """alignment tax: held-out instruction/chat data (SFT format) whose perplexity is measured for both models"""
    heldout_limit: int = at_least(0, 0)
    """use only the first N held-out records (0: all)"""
    max_length: int = at_least(1, 512)
    """longest held-out sequence in tokens (longer ones are cut)"""
    trust_remote_code: bool = False
    """run code shipped with a hub model (off unless you trust it)"""

    def validate(self) -> None:
        if self.benchmark:
            self._validate_benchmark()
        elif self.responses or self.baseline_responses:
            raise AlignkitError("--responses and --baseline-responses hold answers to a benchmark's prompts",
                                fix="add --benchmark ifeval")  # fmt: skip
        else:
            missing = [flag for flag, value in (("--model", self.model), ("--baseline", self.baseline),
                                                ("--prompts", self.prompts), ("--judge", self.judge),
                                                ("--output", self.output)) if not value]  # fmt: skip
            if missing:
                raise AlignkitError(
                    f"missing {', '.join(missing)}",
                    fix="e.g. alignkit eval --model outputs/dpo --baseline outputs/sft --prompts prompts.jsonl "
                    "--judge rm:outputs/rm --output outputs/eval",
                )

    def _validate_benchmark(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise AlignkitError(f"unknown benchmark '{self.benchmark}'", fix=f"--benchmark {' or '.join(BENCHMARKS)}")
        example = "e.g. alignkit eval --benchmark ifeval --model outputs/dpo [--baseline outputs/sft] --output outputs/ifeval"
        if not self.output:
            raise AlignkitError("missing --output", fix=example)
        if bool(self.model) == bool(self.responses):
            raise AlignkitError("give --model (to generate its answers) or --responses (to score answers you have), one of them",
                                fix=example)  # fmt: skip
        if self.baseline and self.baseline_responses and self.responses:
            raise AlignkitError("--baseline with --baseline-responses only scores the model's answers for the KL, "
                                "which needs the model: --responses gives none",
                                fix="pass --model instead of --responses, or leave --baseline out")  # fmt: skip
        extra = [flag for flag, value in (("--judge", self.judge), ("--gold-judge", self.gold_judge),
                                          ("--task-prompts", self.task_prompts), ("--heldout-data", self.heldout_data)) if value]  # fmt: skip
        if extra:
            raise AlignkitError(f"{', '.join(extra)}: not with --benchmark, whose own rules judge the answers",
                                fix="leave them out, or measure them in a run of alignkit eval without --benchmark")  # fmt: skip


# --- one model's share of the work ----------------------------------------------------------------------


@dataclass
class ModelSide:
    """What one model produced: its answers, and the log-probs it gives to the model's answers."""

    samples: list[Sample]
    seq_logps: tuple[torch.Tensor, torch.Tensor] | None
    """[N, T] log-probs of the evaluated model's answer tokens under this model (0 off the answer), and the mask."""
    generation_s: float = 0.0
    """wall seconds that answering the prompts took (not loading the model, not scoring)"""
    task_accuracy: float | None = None
    heldout_nll: float | None = None
    heldout_tokens: int = 0


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def answer_logprobs(model: TokenLogprobModel, samples: list[Sample], pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[N, T]`` of each sample's first completion (and its stop token) given its prompt, and the mask.

    Rows are laid out as in GRPO (`generation.rollout_rows`): prompt then answer, scored on the answer. Batches are
    padded to one global width so that the two models' tensors line up position by position.
    """
    rows = rollout_rows([Sample(s.prompt, s.prompt_token_ids, s.completions[:1]) for s in samples])
    width = max(len(row[0].input_ids) for row in rows)
    device = next(model.parameters()).device
    logps = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id).to(device)
            out = batch_logprobs(model, batch).double().cpu()
            logps[start : start + out.shape[0], : out.shape[1]] = out
            mask[start : start + out.shape[0], : out.shape[1]] = (batch.labels != IGNORE).cpu()
    return logps, mask


def _task_accuracy(config: EvalConfig, generator: TransformersGenerator, records: list[PromptWithAnswer]) -> float:
    result = evaluate_rewards(generator, build_scorer(config.task_reward, timeout=config.reward_timeout), records, config.max_new_tokens)
    return float(result["reward"])


def _heldout_nll(config: EvalConfig, model: TokenLogprobModel, tokenizer, records) -> tuple[float, int]:
    examples, _ = truncate(encode_conversations(tokenizer, records, last_only=False), config.max_length)
    if not examples:
        raise AlignkitError("no held-out example is left after truncation", where=config.heldout_data,
                            fix="raise --max-length")  # fmt: skip
    n_tokens = sum(sum(1 for t in e.labels if t != IGNORE) for e in examples)
    return mean_nll(model, examples, tokenizer.pad_token_id, config.batch_size), n_tokens


def run_side(
    config: EvalConfig,
    name: str,
    prompts: list[PromptWithAnswer] | None,
    *,
    score_samples: list[Sample] | None,
    score_own: bool = False,
    task_records: list[PromptWithAnswer] | None,
    heldout_records: list | None,
    log=print,
) -> tuple[ModelSide, Any]:
    """Load one model, answer the prompts (none when `prompts` is None), and score the log-probs of `score_samples`
    (its own with `score_own`)."""
    tokenizer = load_tokenizer(name, trust_remote_code=config.trust_remote_code)
    model = load_model(name, trust_remote_code=config.trust_remote_code).to(_device())
    generator = TransformersGenerator(model, tokenizer, batch_size=config.batch_size)
    samples: list[Sample] = []
    generation_s = 0.0
    if prompts is not None:
        params = SamplingParams(1, config.temperature, config.top_p, config.max_new_tokens, config.seed)
        log(f"{name}: answering {len(prompts)} prompts")
        started = time.perf_counter()
        samples = generator.generate([r.prompt for r in prompts], params)
        generation_s = time.perf_counter() - started
    scored = TokenLogprobModel(model)
    seq_logps = None
    if score_own:
        score_samples = samples
    if score_samples is not None:
        seq_logps = answer_logprobs(scored, score_samples, tokenizer.pad_token_id, config.batch_size)
    side = ModelSide(samples, seq_logps, generation_s)  # type: ignore[arg-type]
    if task_records:
        log(f"{name}: task accuracy on {len(task_records)} prompts")
        side.task_accuracy = _task_accuracy(config, generator, task_records)
    if heldout_records:
        side.heldout_nll, side.heldout_tokens = _heldout_nll(config, scored, tokenizer, heldout_records)
    del generator, scored, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return side, tokenizer


# --- numbers ---------------------------------------------------------------------------------------------


def clean(value: Any) -> Any:
    """JSON-safe: NaN and ±inf become None (JSON has neither), numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _maybe(fn, *args, **kwargs) -> Any:
    """A metric that has no value on this input (all answers empty, one answer) is None, not a crash."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, ZeroDivisionError):
        return None


def compare(
    scores_model: np.ndarray,
    scores_baseline: np.ndarray,
    lengths_model: np.ndarray,
    lengths_baseline: np.ndarray,
    answers_model: list[str],
    answers_baseline: list[str],
    *,
    tie_tolerance: float = 0.0,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every pairwise number of `alignkit eval` from the two answer sets and their scores (no model needed)."""
    judgments = metrics.pairwise_judgments(scores_model, scores_baseline, tie_tolerance)
    low, high = metrics.bootstrap_ci(judgments, n_resamples=n_resamples, seed=seed)
    lc = metrics.length_controlled_win_rate(judgments, lengths_model - lengths_baseline)
    corr = _maybe(length_reward_correlation, np.concatenate([lengths_model, lengths_baseline]),
                  np.concatenate([scores_model, scores_baseline]))  # fmt: skip
    return {
        "n": int(judgments.size),
        "win_rate": metrics.win_rate(judgments),
        "win_rate_ci95": [low, high],
        "wins": int((judgments == 1.0).sum()),
        "ties": int((judgments == 0.5).sum()),
        "losses": int((judgments == 0.0).sum()),
        "length_controlled": asdict(lc),
        "mean_score": {"model": float(scores_model.mean()), "baseline": float(scores_baseline.mean())},
        "mean_length_tokens": {"model": float(lengths_model.mean()), "baseline": float(lengths_baseline.mean())},
        "length_reward_correlation": None if corr is None else asdict(corr),
        "diversity": {
            "distinct_1": _maybe(metrics.distinct_n, answers_model, 1),
            "distinct_2": _maybe(metrics.distinct_n, answers_model, 2),
            "self_bleu": _maybe(metrics.self_bleu, answers_model) if len(answers_model) > 1 else None,
        },
        "refusal_rate": {"model": metrics.refusal_rate(answers_model), "baseline": metrics.refusal_rate(answers_baseline)},
    }


GOLD_KEYS = ("n", "win_rate", "win_rate_ci95", "wins", "ties", "losses", "length_controlled", "mean_score", "length_reward_correlation")
"""What `--gold-judge` adds to eval.json: the judge-dependent numbers of `compare` (lengths and diversity do not depend on it)."""


def kl_numbers(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """KL(model ‖ baseline) on the model's answers: per-sequence sums of log-prob differences, k1 and k3."""
    per_sequence = torch.where(mask, logps - ref_logps, torch.zeros_like(logps)).sum(-1)
    tokens = int(mask.sum())
    k1 = metrics.kl_to_reference(logps, ref_logps, mask, "k1")
    return {
        "kl": k1,
        "kl_k3": metrics.kl_to_reference(logps, ref_logps, mask, "k3"),
        "kl_per_token": k1 * mask.shape[0] / max(tokens, 1),
        "per_sequence": [float(x) for x in per_sequence],
        "tokens": tokens,
    }


GREEDY_KL_NOTE = "measured on greedy answers: a log-likelihood ratio, not an unbiased KL estimate; use --temperature 1 for one"
DIFFERENT_TOKENIZERS = "the model and the baseline have different tokenizers, so their log-probs of one answer do not compare"


def kl_entry(model: ModelSide, baseline: ModelSide, temperature: float) -> dict[str, Any]:
    """`kl` of eval.json: `kl_numbers` of the model's answers under the model and under the baseline (both sides'
    `seq_logps`), with a note when the answers were greedy."""
    assert model.seq_logps is not None and baseline.seq_logps is not None, "both sides score the model's answers"
    (logps, mask), (ref_logps, _) = model.seq_logps, baseline.seq_logps
    kl = kl_numbers(logps, ref_logps, mask)
    if temperature == 0:
        # Greedy answers are not samples from π, so the mean log-ratio on them is not an unbiased KL
        # estimate (it can even be negative); sampled answers (--temperature 1) give one.
        kl["note"] = GREEDY_KL_NOTE
    return kl


def same_vocabulary(config: EvalConfig, model_tokenizer, baseline: str) -> bool:
    """Whether `baseline`'s tokenizer has the model's vocabulary: only then do both score the same token ids."""
    return model_tokenizer.get_vocab() == load_tokenizer(baseline, trust_remote_code=config.trust_remote_code).get_vocab()


# --- the command -------------------------------------------------------------------------------------------


def _prompt_text(record: PromptWithAnswer) -> str:
    if len(record.prompt) == 1:
        return record.prompt[0].content
    return "\n\n".join(f"{m.role}: {m.content}" for m in record.prompt)


def print_table(result: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    def win_rate(numbers: dict[str, Any]) -> str:
        low, high = numbers["win_rate_ci95"]
        return f"{numbers['win_rate']:.3f}  95% CI [{low:.3f}, {high:.3f}]"

    lc, div = result["length_controlled"], result["diversity"]
    rows = [
        ("win rate (model over baseline)", win_rate(result)),
        ("wins / ties / losses", f"{result['wins']} / {result['ties']} / {result['losses']}"),
        ("length-controlled win rate", fmt(lc["win_rate"])),
        ("mean score (model, baseline)", f"{fmt(result['mean_score']['model'])}, {fmt(result['mean_score']['baseline'])}"),
        ("mean length tokens (model, baseline)",
         f"{fmt(result['mean_length_tokens']['model'])}, {fmt(result['mean_length_tokens']['baseline'])}"),
        ("length-score correlation (Spearman)", fmt((result["length_reward_correlation"] or {}).get("spearman"))),
        ("distinct-1 / distinct-2 / self-BLEU", f"{fmt(div['distinct_1'])} / {fmt(div['distinct_2'])} / {fmt(div['self_bleu'])}"),
        ("refusal rate (model, baseline)", f"{fmt(result['refusal_rate']['model'])}, {fmt(result['refusal_rate']['baseline'])}"),
        ("KL(model || baseline), nats/answer", fmt(result["kl"]["kl"]) if "kl" in result["kl"] else result["kl"].get("skipped", "-")),
    ]  # fmt: skip
    gold = result.get("gold")
    if gold:
        rows[2:2] = [
            ("held-out judge win rate", win_rate(gold)),
            ("held-out judge length-controlled", fmt(gold["length_controlled"]["win_rate"])),
        ]
    tax = result.get("alignment_tax")
    if tax:
        for key, values in tax["before_after"].items():
            rows.append((f"{key} (baseline -> model)", f"{fmt(values['baseline'])} -> {fmt(values['model'])}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=out)


def _benchmark_side(name: str, given: list[str] | None, run: ModelSide | None, prompts: list[ifeval.IFEvalPrompt]) -> ifeval.Side:
    """One side of a benchmark run: the answers read from a file (`given`), or those a model generated (`run`)."""
    if given is not None:
        return ifeval.Side(name, given, ifeval.score(prompts, given))
    assert run is not None, "a side without a response file is generated"
    completions = [sample.completions[0] for sample in run.samples]
    responses = [c.text for c in completions]
    return ifeval.Side(name, responses, ifeval.score(prompts, responses), [len(c.token_ids) for c in completions],
                       [not c.finished for c in completions], run.generation_s)  # fmt: skip


def _benchmark_runs(config: EvalConfig, records: list[PromptWithAnswer], baseline_given: bool,
                    log) -> tuple[ModelSide | None, ModelSide | None, dict[str, Any] | None]:  # fmt: skip
    """The models' share of a benchmark run, one model in memory at a time: the model's answers (None with
    --responses), the baseline's (None without --baseline; without answers when they come from a file), and the
    `kl` of eval.json (None without a baseline model, else its numbers or why it was skipped)."""
    model_run = model_tok = None
    if config.model:
        # The model scores its own answers only when a baseline model will score them too.
        model_run, model_tok = run_side(config, config.model, records, score_samples=None, score_own=bool(config.baseline),
                                        task_records=None, heldout_records=None, log=log)  # fmt: skip
    if not config.baseline:
        return model_run, None, None
    skipped = None
    if model_run is None:
        skipped = "the model's answers were read from --responses: there is no model to score them under"
    elif not same_vocabulary(config, model_tok, config.baseline):
        skipped = DIFFERENT_TOKENIZERS
    if baseline_given and skipped:
        return model_run, None, {"skipped": skipped}  # the baseline model would have nothing to do
    if baseline_given:
        log(f"{config.baseline}: scoring the model's answers for the KL (its own answers are read from {config.baseline_responses})")
    baseline_run, _ = run_side(config, config.baseline, None if baseline_given else records,
                               score_samples=None if skipped else model_run.samples,  # type: ignore[union-attr]
                               task_records=None, heldout_records=None, log=log)  # fmt: skip
    kl = {"skipped": skipped} if skipped else kl_entry(model_run, baseline_run, config.temperature)  # type: ignore[arg-type]
    return model_run, baseline_run, kl


def run_benchmark(config: EvalConfig) -> dict[str, Any]:
    """`alignkit eval --benchmark ifeval`: answer IFEval's prompts (or read the answers) and score them by its rules."""
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    source = config.prompts or ifeval.BUILTIN_PROMPTS
    every = ifeval.load_prompts(source)
    prompts = every[: config.limit or None]
    known = {p.text for p in every}
    # Response files are read before any model loads: a bad one fails in a second, not after generation.
    model_given = ifeval.read_responses(config.responses, prompts, known) if config.responses else None
    baseline_given = ifeval.read_responses(config.baseline_responses, prompts, known) if config.baseline_responses else None
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)

    model_run, baseline_run, kl = _benchmark_runs(config, [p.record for p in prompts], baseline_given is not None, log)
    model = _benchmark_side(config.model or config.responses, model_given, model_run, prompts)
    baseline = None
    if config.baseline or config.baseline_responses:
        # Read answers name their file, generated ones their model.
        baseline = _benchmark_side(config.baseline_responses or config.baseline, baseline_given, baseline_run, prompts)
    result = ifeval.benchmark_numbers([p.instruction_ids for p in prompts], model, baseline,
                                      n_resamples=config.bootstrap_resamples, seed=config.seed)  # fmt: skip
    result = clean({
        **result,
        **({"kl": kl} if kl is not None else {}),
        "prompts": source,
        "decoding": {"greedy": config.temperature == 0, "temperature": config.temperature, "top_p": config.top_p,
                     "max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size, "seed": config.seed},
        "config": asdict(config),
    })  # fmt: skip
    (output / "eval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    write_jsonl(ifeval.sample_rows(prompts, model, baseline, result.get("kl", {}).get("per_sequence")),
                str(output / "samples.jsonl"))  # fmt: skip
    write_jsonl(ifeval.response_rows(prompts, model), str(output / "responses.jsonl"))
    if baseline is not None:
        write_jsonl(ifeval.response_rows(prompts, baseline), str(output / "baseline_responses.jsonl"))
    print(ifeval.format_table(result))
    for role, side in (("model", model), ("baseline", baseline)):
        if side is not None and side.cut and any(side.cut):
            log(f"{role} {side.name}: {sum(side.cut)} of {len(prompts)} answers were cut at --max-new-tokens {config.max_new_tokens}; "
                "they are scored as they stand (a cut answer usually breaks length and ending instructions); "
                "where they are long answers rather than repetition loops (see samples.jsonl), raise --max-new-tokens (e.g. 1280)")  # fmt: skip
    written = "samples.jsonl, responses.jsonl" + (" and baseline_responses.jsonl" if baseline is not None else "")
    log(f"wrote {output / 'eval.json'}, {written} ({len(prompts)} prompts)")
    return result


def run_eval(config: EvalConfig) -> dict[str, Any]:
    if config.benchmark:
        return run_benchmark(config)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    prompts, _ = load_records(config.prompts, "prompt", limit=config.limit or None)
    if not prompts:
        raise AlignkitError("no prompts", where=config.prompts)
    task_records = None
    if config.task_prompts:
        task_records, _ = load_records(config.task_prompts, "prompt", limit=config.task_limit or None)
        check_references(build_scorer(config.task_reward, timeout=config.reward_timeout), task_records)
    heldout_records = None
    if config.heldout_data:
        heldout_records, _ = load_records(config.heldout_data, "conversation", limit=config.heldout_limit or None)
    scorer = build_scorer(config.judge, timeout=config.reward_timeout)
    gold_scorer = build_scorer(config.gold_judge, timeout=config.reward_timeout) if config.gold_judge else None
    for judge in (scorer, gold_scorer):
        check_references(judge, prompts)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)

    # The model first: its own answers' log-probs, then the baseline's log-probs of the very same token ids.
    first, model_tok = run_side(config, config.model, prompts, score_samples=None, score_own=True,
                                task_records=task_records, heldout_records=heldout_records, log=log)  # fmt: skip
    same_vocab = same_vocabulary(config, model_tok, config.baseline)
    second, _ = run_side(config, config.baseline, prompts, score_samples=first.samples if same_vocab else None,
                         task_records=task_records, heldout_records=heldout_records, log=log)  # fmt: skip

    answers_m = [s.completions[0].text for s in first.samples]
    answers_b = [s.completions[0].text for s in second.samples]
    lengths_m = np.array([len(s.completions[0].token_ids) for s in first.samples], dtype=np.float64)
    lengths_b = np.array([len(s.completions[0].token_ids) for s in second.samples], dtype=np.float64)
    n = len(prompts)
    flat_prompts = [r.prompt for r in prompts] * 2
    references = [r.answer for r in prompts] * 2
    scores = scorer.score(flat_prompts, answers_m + answers_b, references).double().cpu().numpy()
    scores_m, scores_b = scores[:n], scores[n:]
    gold = None
    if gold_scorer is not None:
        gold = gold_scorer.score(flat_prompts, answers_m + answers_b, references).double().cpu().numpy()

    result: dict[str, Any] = {
        "model": config.model,
        "baseline": config.baseline,
        "prompts": config.prompts,
        "judge": config.judge,
        "decoding": "greedy" if config.temperature == 0 else f"temperature {config.temperature}, top-p {config.top_p}",
        **compare(scores_m, scores_b, lengths_m, lengths_b, answers_m, answers_b,
                  tie_tolerance=config.tie_tolerance, n_resamples=config.bootstrap_resamples, seed=config.seed),  # fmt: skip
    }
    if gold is not None:
        judged = compare(gold[:n], gold[n:], lengths_m, lengths_b, answers_m, answers_b,
                         tie_tolerance=config.tie_tolerance, n_resamples=config.bootstrap_resamples, seed=config.seed)  # fmt: skip
        result["gold"] = {"judge": config.gold_judge, **{k: judged[k] for k in GOLD_KEYS}}
    result["kl"] = kl_entry(first, second, config.temperature) if same_vocab else {"skipped": DIFFERENT_TOKENIZERS}

    before: dict[str, float] = {}
    after: dict[str, float] = {}
    if task_records:
        before[config.task_reward], after[config.task_reward] = second.task_accuracy, first.task_accuracy  # type: ignore[assignment]
    if heldout_records:
        before["perplexity"] = metrics.perplexity(second.heldout_nll * second.heldout_tokens, second.heldout_tokens)  # type: ignore[operator]
        after["perplexity"] = metrics.perplexity(first.heldout_nll * first.heldout_tokens, first.heldout_tokens)  # type: ignore[operator]
    if before:
        tax = metrics.alignment_tax(before, after)
        result["alignment_tax"] = {
            "before_after": {k: {"baseline": before[k], "model": after[k]} for k in before},
            **asdict(tax),
        }

    per_sequence_kl = result["kl"].get("per_sequence")
    rows = []
    for i, record in enumerate(prompts):
        rows.append({
            "prompt": _prompt_text(record),
            "answer_model": answers_m[i],
            "answer_baseline": answers_b[i],
            "score_model": float(scores_m[i]),
            "score_baseline": float(scores_b[i]),
            "length_model": int(lengths_m[i]),
            "length_baseline": int(lengths_b[i]),
            **({"gold_score_model": float(gold[i]), "gold_score_baseline": float(gold[n + i])} if gold is not None else {}),
            **({"kl": per_sequence_kl[i]} if per_sequence_kl else {}),
        })  # fmt: skip
    result = clean(result)
    (output / "eval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    write_jsonl(rows, str(output / "samples.jsonl"))
    print_table(result)
    log(f"wrote {output / 'eval.json'} and {output / 'samples.jsonl'} ({n} prompts)")
    return result

