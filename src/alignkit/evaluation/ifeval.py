"""IFEval as a benchmark (`alignkit eval --benchmark ifeval`): the paper's four accuracies with bootstrap intervals.

IFEval (Zhou et al. 2023, arXiv:2311.07911) asks 541 prompts, each with one to three verifiable instructions
("no commas", "at least 300 words", "end with 'Peace!'"); `rewards.ifeval.follow_instructions` says which of them
a response follows, strictly and in the benchmark's loose mode. From those verdicts come the paper's four numbers:

* prompt-level accuracy (strict, loose): the share of prompts whose response follows *all* its instructions;
* instruction-level accuracy (strict, loose): followed instructions / all instructions, pooled over prompts.

Each is a ratio ``Σ_i a_i / Σ_i b_i`` over prompts i (`ratio_terms`): a prompt-level number has ``a_i`` = 1 when
prompt i's response follows everything and ``b_i = 1``; an instruction-level one has ``a_i`` = instructions of
prompt i followed and ``b_i`` = its instructions. The 95 % interval is a percentile bootstrap over *prompts*
(Efron 1979): draw n prompt indices with replacement, recompute the ratio of sums on the draw, and take the 2.5 %
and 97.5 % quantiles over the draws. Resampling prompts, not instructions, keeps a prompt's instructions
together: they are judged on one response and are not independent. For the instruction level this is the
bootstrap of a ratio estimator (numerator and denominator both vary with the draw).

A difference model − baseline is paired: both sides are recomputed on the *same* drawn indices, so what is hard
for both (a prompt nobody follows) cancels within each draw and the interval is narrower than two separate
ones would suggest. One seeded draw (`resample_indices`) serves every number, so the intervals of one run agree
with each other, and the prompt-level interval equals `metrics.bootstrap_ci` of the 0/1 outcomes with that seed.

Everything below except `load_prompts`, `read_responses` and `score` is a pure function of lists and arrays;
`evaluate.run_benchmark` loads the models, generates and writes the files.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignkit.data.loading import InvalidRecord, load_records, read_rows
from alignkit.data.records import PromptWithAnswer
from alignkit.errors import AlignkitError, DataError
from alignkit.rewards.ifeval import count_words, follow_instructions, parse_reference

__all__ = [
    "BUILTIN_PROMPTS",
    "CONFIDENCE",
    "LEVELS",
    "Following",
    "IFEvalPrompt",
    "Side",
    "accuracies",
    "benchmark_numbers",
    "format_table",
    "length_numbers",
    "load_prompts",
    "paired_differences",
    "per_instruction_type",
    "ratio_terms",
    "read_responses",
    "response_of",
    "resample_indices",
    "resampled_ratios",
    "response_rows",
    "sample_rows",
    "score",
    "sorted_types",
]

BUILTIN_PROMPTS = "builtin:ifeval"
"""IFEval's 541 prompts as they ship with alignkit: the default --prompts of --benchmark ifeval"""
CONFIDENCE = 0.95
LEVELS: dict[str, str] = {
    "prompt_level_strict": "prompt-level strict",
    "prompt_level_loose": "prompt-level loose",
    "instruction_level_strict": "instruction-level strict",
    "instruction_level_loose": "instruction-level loose",
}
"""The paper's four numbers: their key in eval.json and their label, in the paper's order."""
MODES = ("strict", "loose")


# --- prompts and answers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IFEvalPrompt:
    """One benchmark prompt: its key, its text, its instructions, and the record the generator answers."""

    key: Any
    """the row's 'key' (IFEval's id), or its line number when it has none"""
    text: str
    """the prompt as the row gives it: what a response file's 'prompt' must equal"""
    instruction_ids: list[str]
    kwargs: list[dict[str, Any]]
    record: PromptWithAnswer


def load_prompts(source: str) -> list[IFEvalPrompt]:
    """Every prompt of an IFEval file (rows `{key, prompt, instruction_id_list, kwargs}`), instructions checked.

    A row without instructions, with an unknown instruction id or an ill-typed argument is an error at its line,
    before any model is loaded; so is a prompt that appears twice (responses are matched by prompt text).
    """
    records, _ = load_records(source, "prompt")
    prompts: list[IFEvalPrompt] = []
    seen: dict[str, int] = {}
    # load_records skips nothing without skip_invalid, so its records line up with the rows one to one.
    for (number, row), record in zip(read_rows(source), records):
        if "instruction_id_list" not in row or not isinstance(row.get("prompt"), str):
            raise DataError("not an IFEval prompt: a string 'prompt' and 'instruction_id_list'/'kwargs' are needed",
                            path=source, line=number, fix=f"give a file of IFEval rows, e.g. {BUILTIN_PROMPTS} or a subset of it")  # fmt: skip
        ids, kwargs = parse_reference(record.answer)
        try:
            # An empty response follows nothing, but every instruction is parsed first: this checks the arguments.
            follow_instructions("", ids, kwargs)
        except AlignkitError as exc:
            raise DataError(exc.what, path=source, line=number, fix=exc.fix) from None
        text = row["prompt"]
        if text in seen:
            raise DataError(f"the same prompt as line {seen[text]}: responses could not be told apart", path=source,
                            line=number, fix="remove the repeated prompt")  # fmt: skip
        seen[text] = number
        prompts.append(IFEvalPrompt(row.get("key", number), text, ids, kwargs, record))
    return prompts


RESPONSE_FIELDS = ('a string "prompt" and the answer in "response" (IFEval\'s input_response_data), "best" '
                   '(alignkit generate --best-of) or "completions" holding one completion (alignkit generate)')
"""What `read_responses` accepts in a row, as its errors say it."""


def response_of(row: dict[str, Any]) -> str | None:
    """The answer a response row holds: its "response"; else its "best" (an `alignkit generate --best-of` row); else
    the one string of its "completions" (an `alignkit generate` row). None for anything else."""
    for field in ("response", "best"):
        if field in row:
            return row[field] if isinstance(row[field], str) else None
    completions = row.get("completions")
    if isinstance(completions, list) and len(completions) == 1 and isinstance(completions[0], str):
        return completions[0]
    return None


def read_responses(path: str, prompts: Sequence[IFEvalPrompt], known: Collection[str]) -> list[str]:
    """The response to each of `prompts` from a file of `{"prompt", "response"}` rows (IFEval's input_response_data)
    or of `alignkit generate` rows (`response_of`).

    Rows are matched to prompts by exact prompt text, as the reference implementation does. A row whose prompt is
    not in `known` (every prompt of the prompt file), a second row for one prompt, or a row without an answer
    `response_of` accepts is an error at its line; a row for a known prompt that is not in `prompts` (left out by
    --limit) is skipped; a prompt of `prompts` that no row answers is an error naming its key.
    """
    wanted = {p.text for p in prompts}
    found: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, row in read_rows(path):
        if isinstance(row, InvalidRecord):
            raise DataError(str(row), path=path, line=number)
        response = response_of(row) if isinstance(row, dict) and isinstance(row.get("prompt"), str) else None
        if response is None:
            raise DataError(f"a response row must be an object with {RESPONSE_FIELDS}", path=path, line=number,
                            fix='write one {"prompt": ..., "response": ...} object per line, or pass the output of '
                                "alignkit generate with --num-samples 1 or --best-of N")  # fmt: skip
        prompt = row["prompt"]
        if prompt not in known:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise DataError(f"the prompt {shown!r} is not one of the prompts of --prompts", path=path, line=number,
                            fix="a response file answers the prompts of --prompts word for word (IFEval's input_response_data)")  # fmt: skip
        if prompt in lines:
            raise DataError(f"a second response to the prompt of line {lines[prompt]}", path=path, line=number,
                            fix="keep one response per prompt")  # fmt: skip
        lines[prompt] = number
        if prompt in wanted:
            found[prompt] = response
    missing = [p.key for p in prompts if p.text not in found]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise AlignkitError(f"no response to {len(missing)} of the {len(prompts)} prompts (keys {shown})", where=path,
                            fix="answer every prompt, or pass --limit N to score the first N prompts only")  # fmt: skip
    return [found[p.text] for p in prompts]


@dataclass(frozen=True)
class Following:
    """Which instructions each response follows: `strict[i][j]` for instruction j of prompt i, `loose` likewise."""

    strict: list[list[bool]]
    loose: list[list[bool]]


def score(prompts: Sequence[IFEvalPrompt], responses: Sequence[str]) -> Following:
    """IFEval's verdicts on each response, in strict and in loose mode (`rewards.ifeval.follow_instructions`)."""
    def verdicts(loose: bool) -> list[list[bool]]:
        return [follow_instructions(r, p.instruction_ids, p.kwargs, loose=loose) for p, r in zip(prompts, responses)]

    return Following(verdicts(loose=False), verdicts(loose=True))


@dataclass(frozen=True)
class Side:
    """One side of the comparison: its answers, which instructions they follow, and how they were made."""

    name: str
    """the model, or the response file its answers were read from"""
    responses: list[str]
    following: Following
    tokens: list[int] | None = None
    """completion tokens of each answer (None when read from a file: no tokenizer saw them)"""
    cut: list[bool] | None = None
    """whether each answer was cut at --max-new-tokens instead of ending by itself"""
    generation_s: float | None = None
    """wall seconds the model took to answer every prompt"""


# --- numbers ---------------------------------------------------------------------------------------------------


def ratio_terms(following: Following) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each of the four numbers as ``Σ_i a_i / Σ_i b_i`` over prompts: the per-prompt ``(a, b)`` of each (see above)."""
    terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for mode in MODES:
        followed = getattr(following, mode)
        hits = np.array([sum(f) for f in followed], dtype=np.float64)
        sizes = np.array([len(f) for f in followed], dtype=np.float64)
        if not sizes.size or not sizes.all():
            raise ValueError("every prompt needs at least one instruction, and there must be a prompt")
        terms[f"prompt_level_{mode}"] = ((hits == sizes).astype(np.float64), np.ones_like(sizes))
        terms[f"instruction_level_{mode}"] = (hits, sizes)
    return {key: terms[key] for key in LEVELS}


def resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``[n_resamples, n]`` prompt indices drawn with replacement by ``numpy.random.default_rng(seed)``.

    Row r holds the same draws as `metrics.bootstrap_ci`'s r-th resample with this seed.
    """
    if n < 1 or n_resamples < 1:
        raise ValueError(f"need at least one prompt and one resample, got {n} and {n_resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def resampled_ratios(numerators: np.ndarray, denominators: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``Σ_{i ∈ draw} a_i / Σ_{i ∈ draw} b_i`` for each row (draw) of `indices`: a ratio estimator per resample."""
    return numerators[indices].sum(-1) / denominators[indices].sum(-1)


def _interval(statistics: np.ndarray) -> list[float]:
    tail = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    return [float(low), float(high)]


def accuracies(following: Following, indices: np.ndarray) -> dict[str, dict[str, Any]]:
    """The four numbers, each ``{"value", "ci95"}``: the ratio on all prompts and its percentile interval over `indices`."""
    return {
        key: {"value": float(a.sum() / b.sum()), "ci95": _interval(resampled_ratios(a, b, indices))}
        for key, (a, b) in ratio_terms(following).items()
    }


def paired_differences(model: Following, baseline: Following, indices: np.ndarray) -> dict[str, dict[str, Any]]:
    """model − baseline for each number, ``{"value", "ci95"}``, both recomputed on the same draws (paired bootstrap)."""
    if [len(f) for f in model.strict] != [len(f) for f in baseline.strict]:
        raise ValueError("model and baseline must answer the same prompts with the same instructions")
    ours, theirs = ratio_terms(model), ratio_terms(baseline)
    out = {}
    for key in LEVELS:
        (a, b), (c, d) = ours[key], theirs[key]
        draws = resampled_ratios(a, b, indices) - resampled_ratios(c, d, indices)
        out[key] = {"value": float(a.sum() / b.sum() - c.sum() / d.sum()), "ci95": _interval(draws)}
    return out


def per_instruction_type(instruction_ids: Sequence[Sequence[str]], model: Following,
                         baseline: Following | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Per instruction type, how often it was followed where it was asked: rows sorted by type id.

    Each row: `instruction`, `count` (how many prompts ask for it), `model_strict`, `model_loose` (the share of those
    followed); with a baseline also `baseline_strict`, `baseline_loose` and `difference_strict`/`_loose` (model −
    baseline).
    """
    sides = {"model": model} | ({"baseline": baseline} if baseline is not None else {})
    tally: dict[str, dict[str, int]] = {}
    for i, ids in enumerate(instruction_ids):
        for j, type_id in enumerate(ids):
            counts = tally.setdefault(type_id, {"count": 0})
            counts["count"] += 1
            for side, following in sides.items():
                for mode in MODES:
                    counts[f"{side}_{mode}"] = counts.get(f"{side}_{mode}", 0) + getattr(following, mode)[i][j]
    rows = []
    for type_id in sorted(tally):
        counts = tally[type_id]
        row: dict[str, Any] = {"instruction": type_id, "count": counts["count"]}
        row |= {f"{side}_{mode}": counts[f"{side}_{mode}"] / counts["count"] for side in sides for mode in MODES}
        if baseline is not None:
            row |= {f"difference_{mode}": row[f"model_{mode}"] - row[f"baseline_{mode}"] for mode in MODES}
        rows.append(row)
    return rows


def length_numbers(responses: Sequence[str], tokens: Sequence[int] | None, cut: Sequence[bool] | None) -> dict[str, Any]:
    """Mean completion tokens, mean words (IFEval's count, comparable across tokenizers), and the answers cut short.

    A cut answer stays in every number above, scored as it stands (it usually breaks length and ending
    instructions); `cut` and `cut_share` say how many there were. Token numbers are None for answers read from a
    file.
    """
    return {
        "mean_tokens": float(np.mean(tokens)) if tokens else None,
        "mean_words": float(np.mean([count_words(r) for r in responses])),
        "cut": int(sum(cut)) if cut is not None else None,
        "cut_share": sum(cut) / len(cut) if cut else None,
    }


def _timing(side: Side) -> dict[str, Any]:
    if side.generation_s is None:
        return {"generation_s": None, "tokens_per_s": None}
    rate = sum(side.tokens or ()) / side.generation_s if side.generation_s > 0 else None
    return {"generation_s": side.generation_s, "tokens_per_s": rate}


def benchmark_numbers(instruction_ids: Sequence[Sequence[str]], model: Side, baseline: Side | None = None, *,
                      n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Every number of an IFEval evaluation (eval.json without the config): per side the four accuracies with
    intervals, lengths and timing; with a baseline the paired differences; and the per-type table."""
    indices = resample_indices(len(instruction_ids), n_resamples, seed)

    def side_numbers(side: Side) -> dict[str, Any]:
        return {
            "name": side.name,
            "accuracy": accuracies(side.following, indices),
            "lengths": length_numbers(side.responses, side.tokens, side.cut),
            "timing": _timing(side),
        }

    result: dict[str, Any] = {
        "benchmark": "ifeval",
        "n": len(instruction_ids),
        "instructions": sum(len(ids) for ids in instruction_ids),
        "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": CONFIDENCE,
                      "method": "percentile bootstrap over prompts (ratio of sums per draw); differences paired on the same draws"},  # fmt: skip
        "model": side_numbers(model),
    }
    if baseline is not None:
        result["baseline"] = side_numbers(baseline)
        result["difference"] = paired_differences(model.following, baseline.following, indices)
    result["per_type"] = per_instruction_type(instruction_ids, model.following, baseline.following if baseline else None)
    return result


# --- rows and the printed table --------------------------------------------------------------------------------


def _answer_row(side: Side, i: int) -> dict[str, Any]:
    strict, loose = side.following.strict[i], side.following.loose[i]
    return {
        "response": side.responses[i],
        "follow_instruction_list_strict": strict,
        "follow_instruction_list_loose": loose,
        "follow_all_strict": all(strict),
        "follow_all_loose": all(loose),
        "tokens": side.tokens[i] if side.tokens is not None else None,
        "cut": side.cut[i] if side.cut is not None else None,
    }


def sample_rows(prompts: Sequence[IFEvalPrompt], model: Side, baseline: Side | None = None,
                kl: Sequence[float | None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """samples.jsonl: per prompt its key, text and instructions, the model's answer and verdicts, with `kl` the
    KL of that answer to the baseline model (nats, `kl_numbers`' per_sequence), and the baseline's answer."""
    return [
        {"key": p.key, "prompt": p.text, "instruction_id_list": p.instruction_ids, "kwargs": p.kwargs,
         **_answer_row(model, i), **({"kl": kl[i]} if kl is not None else {}),
         **({"baseline": _answer_row(baseline, i)} if baseline is not None else {})}
        for i, p in enumerate(prompts)
    ]  # fmt: skip


def response_rows(prompts: Sequence[IFEvalPrompt], side: Side) -> list[dict[str, str]]:
    """The answers in IFEval's input_response_data format, which the reference implementation re-scores."""
    return [{"prompt": p.text, "response": r} for p, r in zip(prompts, side.responses)]


def _with_ci(numbers: dict[str, Any], signed: bool = False) -> str:
    low, high = numbers["ci95"]
    sign = "+" if signed else ""
    return f"{numbers['value']:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def _optional(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """The printed summary of `benchmark_numbers`' result: the four numbers, lengths, timing, the KL to a baseline
    model when the result has one, and the per-type table."""
    sides = ["model"] + (["baseline"] if "baseline" in result else [])
    columns = sides + (["model - baseline"] if "difference" in result else [])
    rows = [["", *columns]]
    for key, label in LEVELS.items():
        cells = [_with_ci(result[side]["accuracy"][key]) for side in sides]
        if "difference" in result:
            cells.append(_with_ci(result["difference"][key], signed=True))
        rows.append([label, *cells])
    rows.append(["mean completion tokens", *(_optional(result[s]["lengths"]["mean_tokens"], ".1f") for s in sides)])
    rows.append(["mean words", *(f"{result[s]['lengths']['mean_words']:.1f}" for s in sides)])
    rows.append(["cut at --max-new-tokens", *(
        "-" if result[s]["lengths"]["cut"] is None
        else f"{result[s]['lengths']['cut']} ({result[s]['lengths']['cut_share']:.1%})" for s in sides
    )])  # fmt: skip
    rows.append(["generation s (tokens/s)", *(
        "-" if result[s]["timing"]["generation_s"] is None
        else f"{result[s]['timing']['generation_s']:.1f} ({_optional(result[s]['timing']['tokens_per_s'], '.1f')})" for s in sides
    )])  # fmt: skip
    if "kl" in result:
        kl = result["kl"]
        rows.append(["KL(model || baseline), nats/answer", kl["skipped"] if "skipped" in kl else _optional(kl["kl"], ".4g")])
    confidence = f"{result['bootstrap']['confidence']:.0%}"
    lines = [f"IFEval: {result['n']} prompts, {result['instructions']} instructions; "
             f"[{confidence} bootstrap CI over prompts{', paired for the difference' if 'difference' in result else ''}]"]  # fmt: skip
    lines += _aligned(rows)
    lines += ["", "per instruction type (share followed, strict / loose)"]
    head = ["instruction", "n", "model"] + (["baseline", "difference"] if "difference" in result else [])
    table = [head]
    for row in sorted_types(result["per_type"]):
        cells = [row["instruction"], str(row["count"]), f"{row['model_strict']:.2f} / {row['model_loose']:.2f}"]
        if "difference" in result:
            cells += [f"{row['baseline_strict']:.2f} / {row['baseline_loose']:.2f}",
                      f"{row['difference_strict']:+.2f} / {row['difference_loose']:+.2f}"]  # fmt: skip
        table.append(cells)
    return "\n".join(lines + _aligned(table))


def sorted_types(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Largest gain first with a baseline; the least followed first without one (where a model needs work)."""
    if rows and "difference_strict" in rows[0]:
        return sorted(rows, key=lambda r: (-r["difference_strict"], -r["difference_loose"], r["instruction"]))
    return sorted(rows, key=lambda r: (r["model_strict"], r["model_loose"], r["instruction"]))


def _aligned(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; a row may end early (lengths have no difference column)."""
    widths = [max(len(row[k]) for row in rows if k < len(row)) for k in range(max(map(len, rows)))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
