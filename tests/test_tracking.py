"""The held-out checkpoint file of online RL: resume keeps exactly the rows of the steps kept, and an alarm
is printed once. The evaluation itself runs in test_grpo.py and test_ppo.py on the tiny model."""

from __future__ import annotations

import json

from alignkit.evaluation.diagnostics import CHECKPOINTS_FILE
from alignkit.evaluation.tracking import HeldOutTracker

# Gold rises then falls while the proxy keeps rising: with the trailing mean over 3 checkpoints the gold peak
# is 7/3 at checkpoint 4, and checkpoint 5 (step 10) has lost 1/3 of a 4/3 gain (25% > 10%) with the proxy up.
GOLD = [0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.0]


def row(step: int) -> dict:
    return {"step": step, "kl": step / 4, "sqrt_kl": (step / 4) ** 0.5, "proxy": float(step), "gold": GOLD[step // 2],
            "length": 10.0, "distinct_2": 0.5}  # fmt: skip


def test_a_resumed_run_rewrites_the_rows_after_its_checkpoint_and_warns_once(tmp_path):
    # The interrupted run got to step 6 but its last checkpoint is step 4: its row 6 must be replaced.
    stale = [row(0), row(2), row(4), {**row(6), "proxy": -99.0}]
    (tmp_path / CHECKPOINTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in stale))
    lines: list[str] = []
    tracker = HeldOutTracker(tmp_path, [], None, None, None, None, None, every=2, max_new_tokens=1, pad_id=0, log=lines.append)  # type: ignore[arg-type]
    tracker.evaluate = lambda step: (row(step), {"reward": float(step)})  # type: ignore[method-assign]
    for step in range(4, 13):
        tracker.on_step(step, 12)
    written = [json.loads(line) for line in (tmp_path / CHECKPOINTS_FILE).read_text().splitlines()]
    assert written == [row(s) for s in range(0, 13, 2)]
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and "overoptimisation, held-out step 10" in warnings[0], lines
    after = tracker.after()
    assert after["eval_after"] == {"reward": 12.0}
    assert after["alarms"]["overoptimisation"]["fired"] and after["alarms"]["overoptimisation"]["at_step"] == 10
    assert not after["alarms"]["length_drift"]["fired"] and not after["alarms"]["mode_collapse"]["fired"]
