"""Rebuild `resources/ifeval_train_prompts.jsonl`: our training requests with IFEval-style verifiable constraints.

Bases are the requests of `sft_instructions.jsonl` and `prefs_alpacaeval_train.jsonl` (alignkit.data.constraints
says which are usable); any base or finished prompt that repeats an IFEval prompt is dropped, since IFEval is an
evaluation set. IFEval's prompts are read from `resources/ifeval_541.jsonl`, or from the JSONL file given as the
argument (one `{"prompt": ...}` per line, as in IFEval's `input_data.jsonl`).
Run: .venv/bin/python scripts/make_constraint_prompts.py [IFEVAL_JSONL]
"""

import json
import sys
from collections import Counter
from pathlib import Path

from alignkit.data.constraints import constrained_prompts, read_bases
from alignkit.data.decontaminate import decontaminate
from alignkit.errors import AlignkitError
from alignkit.models import RESOURCES

N = 2500
SEED = 0
OUTPUT = RESOURCES / "ifeval_train_prompts.jsonl"

ifeval_path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESOURCES / "ifeval_541.jsonl"
if not ifeval_path.is_file():
    raise AlignkitError(
        f"no IFEval prompts at {ifeval_path}: the training prompts cannot be decontaminated",
        fix="pass IFEval's prompts (a JSONL file with a 'prompt' per line) as the argument",
    )
ifeval = [json.loads(line)["prompt"] for line in ifeval_path.read_text(encoding="utf-8").splitlines() if line.strip()]
bases = read_bases([RESOURCES / "sft_instructions.jsonl", RESOURCES / "prefs_alpacaeval_train.jsonl"])
bases, bases_dropped = decontaminate(bases, ifeval, lambda base: base.text)
rows, rows_dropped = decontaminate(constrained_prompts(bases, N, SEED), ifeval, lambda row: row["prompt"])
OUTPUT.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")

print(f"IFEval prompts from {ifeval_path}: {len(ifeval)}")
print(f"bases: {len(bases)} kept, {bases_dropped} dropped as near duplicates of IFEval prompts")
print(f"prompts: {len(rows)} written to {OUTPUT.name}, {rows_dropped} dropped as near duplicates")
print("constraints per prompt:", dict(sorted(Counter(len(row["instruction_id_list"]) for row in rows).items())))
for instruction_id, count in sorted(Counter(i for row in rows for i in row["instruction_id_list"]).items()):
    print(f"  {count:5d}  {instruction_id}")
