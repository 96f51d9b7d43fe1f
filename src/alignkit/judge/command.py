"""`alignkit judge`: AI feedback. Four modes, one output discipline.

- compare (default): `--samples` (the JSONL of `alignkit generate`: prompt + K completions) -> preference
  pairs `{prompt, chosen, rejected, confidence, judge}` for every decided pair of the C(K, 2), or with
  `--rank` one ranking `{prompt, responses (best first), wins}` per prompt. Both load as `comparison` data.
- agreement: `--agreement-with LABELS.jsonl` (prompt/chosen/rejected, e.g. GPT-4 or human labels) -> the
  fraction of pairs where the judge prefers `chosen`, ties counted half.
- critique-revise: `--constitution FILE --prompts FILE` -> SFT rows `{prompt, completion}` (Constitutional
  AI's supervised stage).
- preferences: `--constitution FILE --samples FILE` -> preference pairs judged by a principle drawn per
  prompt (Constitutional AI's AI feedback).

Results are appended to `--output` as each chunk of prompts is done, and every finished prompt is recorded
in a progress log beside it (`NAME.progress.jsonl`: what was judged, ties, dropped pairs). A rerun of the
same command skips what the log says is done and first cuts `--output` back to the last recorded prompt,
so a run killed mid-write (or stopped by a failing server) loses at most the chunk in flight and never
duplicates a row. Changing the judge, template or mode against an existing output is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.config import SEEDS, above, at_least, within
from alignkit.data.loading import InvalidRecord, load_records, parse_prompt, read_rows
from alignkit.data.records import PreferencePair, Prompt, PromptWithAnswer, Ranking, distinct_answers
from alignkit.errors import AlignkitError, DataError
from alignkit.generation import SamplingParams, TransformersGenerator
from alignkit.judge.backends import Judge, build_judge, judge_name
from alignkit.judge.compare import PairRequest, judge_pairs
from alignkit.judge.constitution import Constitution, critique_revise, load_constitution
from alignkit.judge.prompts import Template, load_template, prompt_text
from alignkit.judge.verdicts import Agreement, PairVerdict, agreement, all_pairs, probability_agreement, rank_by_wins
from alignkit.models import load_model, load_tokenizer

Mode = Literal["auto", "compare", "agreement", "critique-revise", "preferences"]


@dataclass
class JudgeConfig:
    """Options of `alignkit judge`."""

    mode: Mode = "auto"
    """compare: judge the completions of --samples into preference pairs; agreement: judge the labelled pairs of --agreement-with and report how often the judge agrees; critique-revise: Constitutional AI revisions of --prompts into SFT data; preferences: judge --samples by principles of --constitution; auto: agreement when --agreement-with is given, else compare"""
    judge: str = "smollm2-135m-instruct"
    """the judge: a model (directory, hub id, alignkit output directory, smollm2-135m-instruct, tiny-llama) or the http(s) URL of an OpenAI-compatible server"""
    samples: str = ""
    """JSONL of `alignkit generate` (prompt and a list of K ≥ 2 completions) to judge (compare, preferences)"""
    agreement_with: str = ""
    """labelled pairs (prompt, chosen, rejected; e.g. GPT-4 or human labels) to measure the judge's agreement on"""
    prompts: str = ""
    """prompts for critique-revise (any file with prompt/instruction/question/messages rows)"""
    constitution: str = ""
    """constitution file (YAML: principles with name, principle, critique, revision) for critique-revise and preferences"""
    output: str = ""
    """JSONL to append results to (pairs, per-pair agreement results, or SFT rows); a progress log NAME.progress.jsonl is kept beside it so a rerun continues where it stopped"""
    template: str = "helpfulness"
    """judging prompt: a built-in rubric (helpfulness, harmlessness, honesty, principle) or a text file with {prompt}, {answer_a}, {answer_b} (and {principle}) placeholders; preferences mode defaults to principle"""
    disagreement: Literal["tie", "drop"] = "tie"
    """when the two presentation orders prefer different answers: tie (no preference; in agreement counted half) or drop (left out)"""
    rank: bool = False
    """compare/preferences with K > 2: write one ranking per prompt (responses best first by pairwise wins) instead of every decided pair"""
    max_answer_chars: int = at_least(0, 4000)
    """cut each answer to this many characters inside the judging prompt (0: no limit)"""
    limit: int = at_least(0, 0)
    """use only the first N prompts or labelled pairs (0: all)"""
    skip_invalid: bool = False
    """skip malformed input rows (counted) instead of stopping at the first one"""
    overwrite: bool = False
    """start afresh even if --output holds results of an earlier run"""
    chunk_size: int = at_least(1, 8)
    """prompts (or labelled pairs) judged together before their results are written"""
    batch_size: int = at_least(1, 8)
    """judging prompts per forward pass of a local judge; prompts per generation batch in critique-revise"""
    api_model: str = ""
    """HTTP judge: the 'model' field of the request (omitted when empty)"""
    api_key_env: str = "OPENAI_API_KEY"
    """HTTP judge: name of the environment variable holding the API key (sent as a Bearer token, never logged or written)"""
    timeout: float = above(0, 60.0)
    """HTTP judge: seconds to wait for one answer"""
    retries: int = at_least(0, 4)
    """HTTP judge: retries of a request that timed out, could not connect, or got HTTP 429/5xx"""
    backoff: float = at_least(0, 1.0)
    """HTTP judge: seconds before the first retry, doubled at each further one (at most 30 s)"""
    workers: int = at_least(1, 4)
    """HTTP judge: requests in flight at once"""
    logprobs: bool = True
    """HTTP judge: ask for log-probabilities of the answer letter (else read the letter: P = 1 or 0)"""
    model: str = "smollm2-135m-instruct"
    """critique-revise: the model that answers, critiques and revises"""
    revisions: int = at_least(1, 1)
    """critique-revise: rounds of critique and revision per prompt (a new principle each round)"""
    temperature: float = at_least(0, 0.7)
    """critique-revise: sampling temperature (0: greedy)"""
    max_new_tokens: int = at_least(1, 256)
    """critique-revise: longest answer, critique or revision in tokens"""
    seed: int = within(SEEDS, 0)
    """seed for drawing principles and for sampling"""
    trust_remote_code: bool = False
    """run code shipped with a hub model (off unless you trust it)"""

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "agreement" if self.agreement_with else "compare"

    def validate(self) -> None:
        mode = self.resolved_mode()
        need = {
            "compare": ("samples",), "agreement": ("agreement_with",), "critique-revise": ("constitution", "prompts", "output"),
            "preferences": ("constitution", "samples"),
        }[mode]  # fmt: skip
        for name in need:
            if not getattr(self, name):
                raise AlignkitError(f"mode {mode} needs --{name.replace('_', '-')}", fix="see alignkit judge --help and docs/judge.md")
        if mode in ("compare", "preferences") and not self.output:
            raise AlignkitError("no output file given", fix="pass --output prefs.jsonl")
        if self.output == "-":
            raise AlignkitError("--output must be a file: results are appended as they come and a rerun continues them")

    def template_spec(self) -> str:
        if self.resolved_mode() == "preferences" and self.template == "helpfulness":
            return "principle"  # the default rubric of the other modes does not ask about a principle
        return self.template


# --- resumable output ----------------------------------------------------------------------------------------


def progress_path(output: str | Path) -> Path:
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + ".progress.jsonl")


class ResumableOutput:
    """`output` (rows) plus a progress log (one header line, then one line per finished unit).

    A unit's rows are appended and flushed to disk before its log line, and each log line records the size
    of `output` after the unit; reopening cuts `output` back to the last recorded size, dropping rows of a
    unit that was cut off, so every unit is written exactly once however often the run is restarted.
    """

    def __init__(self, output: str | Path, header: dict[str, Any], *, overwrite: bool = False):
        self.path, self.log = Path(output), progress_path(output)
        self.entries: list[dict[str, Any]] = []
        if overwrite:
            for p in (self.path, self.log):
                p.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.log.exists():
            self._reopen(header)
        else:
            if self.path.exists() and self.path.stat().st_size > 0:
                raise AlignkitError(
                    f"{self.path} exists and has no progress log ({self.log.name}), so it was not written by this command",
                    fix="pass --overwrite to replace it, or choose another --output",
                )
            self.path.write_bytes(b"")
            self.log.write_text(json.dumps({"header": header}, ensure_ascii=False) + "\n", encoding="utf-8")

    def _reopen(self, header: dict[str, Any]) -> None:
        lines = self.log.read_bytes().split(b"\n")
        good: list[bytes] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except ValueError:
                break  # a log line cut off mid-write: the unit it reported is redone
            good.append(line)
            if "header" in parsed:
                old = parsed["header"]
                changed = [k for k in header if k in old and old[k] != header[k]]
                if changed:
                    raise AlignkitError(
                        f"{self.path} holds results of another run ({', '.join(f'{k}: {old[k]!r} then, {header[k]!r} now' for k in changed)})",
                        fix="rerun with the same options to continue it, or pass --overwrite, or choose another --output",
                    )
            else:
                self.entries.append(parsed)
        if not good:
            raise AlignkitError(f"{self.log} is not a progress log", fix="pass --overwrite or choose another --output")
        self.log.write_bytes(b"\n".join(good) + b"\n")
        size = self.entries[-1]["bytes"] if self.entries else 0
        if not self.path.exists():
            raise AlignkitError(f"{self.path} is missing but its progress log {self.log.name} is there", fix="pass --overwrite to start afresh")
        if self.path.stat().st_size < size:
            raise AlignkitError(f"{self.path} is shorter than its progress log says", fix="pass --overwrite to start afresh")
        with self.path.open("r+b") as handle:
            handle.truncate(size)

    @property
    def done(self) -> set[int]:
        return {e["unit"] for e in self.entries}

    def append(self, unit: int, rows: Sequence[dict[str, Any]], **info: Any) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            handle.flush()
            os.fsync(handle.fileno())
        entry = {"unit": unit, "rows": len(rows), "bytes": self.path.stat().st_size, **info}
        with self.log.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.entries.append(entry)


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


# --- reading inputs ------------------------------------------------------------------------------------------


@dataclass
class SampleRow:
    line: int
    prompt: Prompt
    prompt_field: Any
    """the prompt as the input wrote it (a string or chat messages), copied to the output"""
    completions: list[str]


def read_samples(path: str, *, limit: int = 0, skip_invalid: bool = False) -> list[SampleRow]:
    """Rows of `alignkit generate` output: a prompt and a `completions` list (K ≥ 2 strings)."""
    rows: list[SampleRow] = []
    skipped = 0
    for number, row in read_rows(path):
        try:
            if isinstance(row, InvalidRecord):
                raise row
            if not isinstance(row, dict):
                raise InvalidRecord(f"a row must be a JSON object, not {type(row).__name__}")
            prompt = parse_prompt(row).prompt
            completions = row.get("completions", row.get("responses"))
            if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
                raise InvalidRecord("field 'completions' must be a list of strings (the output of `alignkit generate --num-samples K`)")
            if len(completions) < 2:
                raise InvalidRecord(f"a judge compares answers: this row has {len(completions)} completion(s), at least 2 are needed")
        except InvalidRecord as exc:
            if not skip_invalid:
                raise DataError(str(exc), path=path, line=number, fix="fix or remove this row, or pass --skip-invalid") from None
            skipped += 1
            continue
        rows.append(SampleRow(number, prompt, row.get("prompt", _messages_json(prompt)), completions))
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataError("no rows to judge", path=path)
    if skipped:
        print(f"{path}: skipped {skipped} invalid rows", file=sys.stderr)
    return rows


def _messages_json(prompt: Prompt) -> Any:
    return prompt[-1].content if len(prompt) == 1 else [asdict(m) for m in prompt]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Progress:
    """A one-line progress report on stderr: units done of total, and their rate."""

    def __init__(self, total: int, done: int, what: str):
        self.total, self.done, self.what, self.start, self.new = total, done, what, time.perf_counter(), 0

    def advance(self, n: int) -> None:
        self.done += n
        self.new += n
        rate = self.new / max(time.perf_counter() - self.start, 1e-9)
        print(f"judge: {self.done}/{self.total} {self.what} ({rate:.2f}/s)", file=sys.stderr)


# --- modes ---------------------------------------------------------------------------------------------------


def _header(config: JudgeConfig, judge: str | None, template: Template | None, source: str) -> dict[str, Any]:
    header: dict[str, Any] = {"mode": config.resolved_mode(), "input": source}
    if judge is not None:
        header["judge"] = judge
    if template is not None:
        header["template"] = f"{template.name} ({template.digest})"
    if config.resolved_mode() in ("compare", "preferences", "agreement"):
        header["disagreement"] = config.disagreement
    if config.resolved_mode() in ("compare", "preferences"):
        header["rank"] = config.rank
    if config.constitution:
        header["constitution"] = f"{config.constitution} ({_digest(config.constitution)})"
    return header


def _make_judge(config: JudgeConfig) -> Judge:
    return build_judge(
        config.judge, batch_size=config.batch_size, trust_remote_code=config.trust_remote_code, api_model=config.api_model,
        api_key_env=config.api_key_env, timeout=config.timeout, retries=config.retries, backoff=config.backoff,
        workers=config.workers, logprobs=config.logprobs,
    )  # fmt: skip


def pair_row(row: SampleRow, first: str, second: str, verdict: PairVerdict, judge: Judge, extra: dict[str, Any]) -> dict[str, Any]:
    """A preference pair in the format of human labels, plus the judge's confidence and name."""
    chosen, rejected = (first, second) if verdict.outcome == "first" else (second, first)
    # P(chosen ≻ rejected) in each presentation order: chosen shown first, then chosen shown second.
    orders = [verdict.p_ab, 1 - verdict.p_ba] if verdict.outcome == "first" else [verdict.p_ba, 1 - verdict.p_ab]
    return {
        "prompt": row.prompt_field, "chosen": chosen, "rejected": rejected, "confidence": verdict.confidence,
        "judge": judge.name, **extra, "orders": orders,
    }  # fmt: skip


def run_compare(config: JudgeConfig, judge: Judge | None = None, constitution: Constitution | None = None) -> dict[str, Any]:
    """compare / preferences: judge all pairs of each prompt's completions; write pairs or rankings."""
    rows = read_samples(config.samples, limit=config.limit, skip_invalid=config.skip_invalid)
    template = load_template(config.template_spec(), needs_principle=constitution is not None)
    name = judge.name if judge else judge_name(config.judge, config.api_model)
    out = ResumableOutput(config.output, _header(config, name, template, config.samples), overwrite=config.overwrite)
    judge = judge or _make_judge(config)
    todo = [r for r in rows if r.line not in out.done]
    if out.entries:
        print(f"resuming {config.output}: {len(rows) - len(todo)} prompts already judged, {len(todo)} to go", file=sys.stderr)
    progress = _Progress(len(rows), len(rows) - len(todo), "prompts")
    for chunk in _chunks(todo, config.chunk_size):
        requests: list[PairRequest] = []
        plans = []  # per prompt: its distinct answers, principle, and the slice of `requests` it owns
        for row in chunk:
            answers = distinct_answers(row.completions)
            principle = constitution.draw(f"{config.seed}:{row.line}") if constitution else None
            start = len(requests)
            text = prompt_text(row.prompt)
            for i, j in all_pairs(len(answers)) if len(answers) >= 2 else []:
                requests.append(PairRequest(text, answers[i], answers[j], principle.principle if principle else ""))
            plans.append((row, answers, principle, start, len(requests)))
        verdicts = judge_pairs(judge, template, requests, disagreement=config.disagreement, max_answer_chars=config.max_answer_chars)
        for row, answers, principle, start, end in plans:
            extra = {"principle": principle.name} if principle else {}
            mine = dict(zip(all_pairs(len(answers)), verdicts[start:end]))
            info: dict[str, Any] = {"pairs": len(mine), "ties": [], "dropped": 0}
            if len(answers) < 2:
                info["skipped"] = "fewer than 2 distinct non-empty completions"
            for (i, j), v in mine.items():
                if v.outcome == "tie":
                    info["ties"].append({"answers": [answers[i], answers[j]], "p_first": v.p_first})
                info["dropped"] += v.outcome == "drop"
            if config.rank and len(answers) >= 2:
                order, wins = rank_by_wins(len(answers), mine)
                decided = any(v.outcome in ("first", "second") for v in mine.values())
                written = [{
                    "prompt": row.prompt_field, "responses": [answers[a] for a in order], "wins": wins,
                    "judge": judge.name, **extra,
                }] if decided else []  # fmt: skip
            else:
                written = [
                    pair_row(row, answers[i], answers[j], v, judge, extra)
                    for (i, j), v in mine.items()
                    if v.outcome in ("first", "second")
                ]
            out.append(row.line, written, **extra, **info)
        progress.advance(len(chunk))
    return _report_compare(config, out, judge)


def _report_compare(config: JudgeConfig, out: ResumableOutput, judge: Judge) -> dict[str, Any]:
    entries = out.entries
    summary = {
        "prompts": len(entries),
        "rows": sum(e["rows"] for e in entries),
        "pairs_judged": sum(e["pairs"] for e in entries),
        "ties": sum(len(e["ties"]) for e in entries),
        "dropped": sum(e["dropped"] for e in entries),
        "skipped_prompts": sum("skipped" in e for e in entries),
    }
    what = "rankings" if config.rank else "preference pairs"
    print(
        f"judged {summary['pairs_judged']} pairs of {summary['prompts']} prompts with {judge.name}: {summary['rows']} {what} "
        f"written to {config.output}; {summary['ties']} ties, {summary['dropped']} dropped (log: {progress_path(config.output)})"
        + _judge_notes(judge),
        file=sys.stderr,
    )
    return summary


def _judge_notes(judge: Judge) -> str:
    """What an HTTP judge had to work around in this run (answers without a letter, retried requests)."""
    notes = []
    if getattr(judge, "unparsed", 0):
        notes.append(f"{judge.unparsed} answers named neither A nor B (read as ½)")  # type: ignore[attr-defined]
    if getattr(judge, "retried", 0):
        notes.append(f"{judge.retried} requests needed a retry")  # type: ignore[attr-defined]
    return "".join("; " + n for n in notes)


def labelled_pairs(path: str, *, limit: int = 0, skip_invalid: bool = False) -> list[PreferencePair]:
    records, report = load_records(path, "comparison", skip_invalid=skip_invalid)
    pairs: list[PreferencePair] = []
    for record in records:
        pairs.extend(record.pairs() if isinstance(record, Ranking) else [record])  # type: ignore[list-item]
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    return pairs[:limit] if limit else pairs


def judge_agreement(
    judge: Judge,
    template: Template,
    pairs: Sequence[PreferencePair],
    *,
    disagreement: str = "tie",
    max_answer_chars: int = 0,
) -> tuple[Agreement, list[PairVerdict]]:
    """Judge labelled pairs (chosen shown as "first") and measure how often the judge prefers `chosen`."""
    requests = [PairRequest(prompt_text(p.prompt), p.chosen, p.rejected) for p in pairs]
    verdicts = judge_pairs(judge, template, requests, disagreement=disagreement, max_answer_chars=max_answer_chars)  # type: ignore[arg-type]
    return agreement(verdicts), verdicts


_AGREEMENT_WORD = {"first": "agree", "second": "disagree", "tie": "tie", "drop": "drop"}


def run_agreement(config: JudgeConfig, judge: Judge | None = None) -> dict[str, Any]:
    """Judge the labelled pairs of --agreement-with; with --output, per-pair results are kept and resumable."""
    pairs = labelled_pairs(config.agreement_with, limit=config.limit, skip_invalid=config.skip_invalid)
    template = load_template(config.template_spec())
    name = judge.name if judge else judge_name(config.judge, config.api_model)
    out = ResumableOutput(config.output, _header(config, name, template, config.agreement_with), overwrite=config.overwrite) if config.output else None
    judge = judge or _make_judge(config)
    done = out.done if out else set()
    outcomes = [e["outcome"] for e in out.entries] if out else []
    p_chosen = [e["p_chosen"] for e in out.entries] if out else []
    todo = [(i, p) for i, p in enumerate(pairs) if i not in done]
    if out and out.entries:
        print(f"resuming {config.output}: {len(done)} pairs already judged, {len(todo)} to go", file=sys.stderr)
    progress = _Progress(len(pairs), len(pairs) - len(todo), "labelled pairs")
    for chunk in _chunks(todo, config.chunk_size):
        _, verdicts = judge_agreement(judge, template, [p for _, p in chunk], disagreement=config.disagreement, max_answer_chars=config.max_answer_chars)
        for (i, pair), v in zip(chunk, verdicts):
            outcomes.append(v.outcome)
            p_chosen.append(v.p_first)
            if out:
                result = {"origin": pair.origin, "p_chosen": v.p_first, "orders": [v.p_ab, 1 - v.p_ba], "result": _AGREEMENT_WORD[v.outcome]}
                out.append(i, [result], outcome=v.outcome, p_chosen=v.p_first)
        progress.advance(len(chunk))
    result = agreement(outcomes)
    summary = {
        "judge": judge.name, "labels": config.agreement_with, "template": template.name, **result.as_dict(),
        "agreement_by_probability": probability_agreement(p_chosen),
        "mean_p_chosen": sum(p_chosen) / len(p_chosen) if p_chosen else math.nan,
    }  # fmt: skip
    print(
        f"{judge.name} against {config.agreement_with}: {result.summary()}; by the averaged probability alone "
        f"(ignoring disagreement between orders): {summary['agreement_by_probability']:.4f}, mean p(chosen) {summary['mean_p_chosen']:.4f}"
        + _judge_notes(judge),
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return summary


def run_critique_revise(config: JudgeConfig) -> dict[str, Any]:
    """Constitutional AI's supervised stage: answer, critique by a drawn principle, revise; write SFT rows."""
    constitution = load_constitution(config.constitution)
    records, report = load_records(config.prompts, "prompt", skip_invalid=config.skip_invalid, limit=config.limit or None)
    print(report.summary(), file=sys.stderr)
    header = _header(config, None, None, config.prompts) | {"model": config.model, "revisions": config.revisions}
    out = ResumableOutput(config.output, header, overwrite=config.overwrite)
    todo = [(i, r) for i, r in enumerate(records) if i not in out.done]
    if out.entries:
        print(f"resuming {config.output}: {len(records) - len(todo)} prompts already revised, {len(todo)} to go", file=sys.stderr)
    if not todo:
        return {"prompts": len(out.entries), "rows": sum(e["rows"] for e in out.entries)}
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    model = load_model(config.model, trust_remote_code=config.trust_remote_code)
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    generator = TransformersGenerator(model, tokenizer, batch_size=config.batch_size)
    progress = _Progress(len(records), len(records) - len(todo), "prompts")
    for chunk in _chunks(todo, config.chunk_size):
        params = SamplingParams(1, config.temperature, 1.0, config.max_new_tokens, config.seed + chunk[0][0])
        prompts = [r.prompt for _, r in chunk]  # type: ignore[attr-defined]
        keys = [f"{config.seed}:{i}" for i, _ in chunk]
        for (i, record), result in zip(chunk, critique_revise(generator, prompts, keys, constitution, params, rounds=config.revisions)):
            assert isinstance(record, PromptWithAnswer)
            final = result.final
            rows = [] if not final.strip() else [{
                "prompt": _messages_json(record.prompt), "completion": final, "initial": result.initial,
                "critiques": result.critiques, "revisions": result.revisions, "principles": result.principles,
            }]  # fmt: skip
            out.append(i, rows, principles=result.principles, **({} if rows else {"skipped": "empty answer and revisions"}))
        progress.advance(len(chunk))
    written = sum(e["rows"] for e in out.entries)
    print(f"wrote {written} revised answers for {len(out.entries)} prompts to {config.output} (SFT data: alignkit sft --data {config.output})", file=sys.stderr)
    return {"prompts": len(out.entries), "rows": written}


def run_judge(config: JudgeConfig) -> Any:
    """`alignkit judge`: dispatch on the mode."""
    mode = config.resolved_mode()
    if mode == "agreement":
        return run_agreement(config)
    if mode == "critique-revise":
        return run_critique_revise(config)
    if mode == "preferences":
        return run_compare(config, constitution=load_constitution(config.constitution))
    return run_compare(config)
