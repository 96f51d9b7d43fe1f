"""`make demo`: the whole recipe on the built-in SmolLM2-135M-Instruct and the shipped data, in about ten
minutes on a 2-core CPU: SFT, a proxy and a held-out ("gold") reward model, DPO, a short PPO, an evaluation
of the aligned model against the start model, and the HTML report. The pipeline is `resources/demo.yaml`; this
module runs it and prints the numbers a reader looks for first.

A rerun skips what is done (the pipeline's skip/resume rules), so a demo cut off halfway goes on from there.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from alignkit.cli import main as cli_main
from alignkit.models import RESOURCES

PIPELINE = RESOURCES / "demo.yaml"
OUTPUT = Path("outputs/demo")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _interval(numbers: dict[str, Any]) -> str:
    low, high = numbers["win_rate_ci95"]
    return f"{numbers['win_rate']:.2f} (95% CI {low:.2f}-{high:.2f}; length-controlled {numbers['length_controlled']['win_rate']:.2f})"


def headline(output: Path) -> list[tuple[str, str]]:
    """The demo's summary lines from the files its stages wrote."""
    evaluation = _json(output / "eval" / "eval.json")
    rm, gold = _json(output / "rm" / "summary.json").get("eval", {}), _json(output / "gold_rm" / "summary.json").get("eval", {})
    ppo = _json(output / "ppo" / "summary.json")
    lines = [
        ("win rate of the aligned model over the start model, by the trained RM", _interval(evaluation)),
        ("... by the held-out judge (RM on human HH-RLHF labels)", _interval(evaluation["gold"])),
        ("KL(aligned || start) on its greedy answers, nats/answer", f"{evaluation['kl']['kl']:.2f}"),
        ("mean answer length in tokens, aligned vs start",
         f"{evaluation['mean_length_tokens']['model']:.0f} vs {evaluation['mean_length_tokens']['baseline']:.0f}"),
        ("reward-model accuracy on held-out pairs: proxy (GPT-4 labels), gold (human labels)",
         f"{rm.get('accuracy', float('nan')):.3f} on {rm.get('pairs')}, {gold.get('accuracy', float('nan')):.3f} on {gold.get('pairs')}"),
    ]  # fmt: skip
    fired = [a["message"] for a in ppo.get("alarms", {}).values() if a.get("fired")]
    lines.append(("PPO alarms (over-optimisation, length drift, mode collapse)", "; ".join(fired) if fired else "none fired"))
    return lines


def main() -> int:
    started = time.perf_counter()
    print(f"alignkit demo: {PIPELINE.name} (SFT -> reward models -> DPO -> PPO -> eval -> report) on the built-in model\n")
    status = cli_main(["run", str(PIPELINE)])
    if status != 0:
        return status
    print("\n" + "=" * 100)
    for label, value in headline(OUTPUT):
        print(f"{label}:\n" + textwrap.indent(value, "    "))
    print("=" * 100)
    print(f"report: {(OUTPUT / 'report.html').resolve()}   (stages: {OUTPUT}/<stage>/, each with its own report.html)")
    print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
