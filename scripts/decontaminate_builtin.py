"""Drop from the shipped training datasets every row that repeats a built-in evaluation prompt.

Run once after a built-in dataset is added or changed: `python scripts/decontaminate_builtin.py`. It rewrites
the training files in place and prints what each evaluation set took out; tests/test_shipped.py then checks
that nothing is left.
"""

from __future__ import annotations

import json
from collections import Counter

from alignkit.data.builtin import BUILTIN
from alignkit.data.decontaminate import EvalIndex, read_prompts, row_text


def main() -> None:
    prompts, owners = [], []
    for name, dataset in BUILTIN.items():
        if dataset.evaluation:
            found = read_prompts(dataset.path)
            prompts += found
            owners += [name] * len(found)
    index = EvalIndex(prompts)
    for name, dataset in BUILTIN.items():
        if dataset.evaluation:
            continue
        lines = [line for line in dataset.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept, by = [], Counter()
        for line in lines:
            hits = index.contaminating(row_text(json.loads(line)))
            by.update({owners[i] for i in hits})
            if not hits:
                kept.append(line)
        dataset.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        print(f"{name}: {len(lines)} -> {len(kept)} rows; repeated prompts of {dict(by) or 'no evaluation set'}")


if __name__ == "__main__":
    main()
