"""Pipelines: `alignkit run PIPELINE.yaml` runs stages (each an alignkit command) whose outputs feed later
stages, skipping the stages already done and resuming the one that was cut off; `alignkit runs` lists what
ran, from the run registry.

- `spec`: the pipeline file, parsed, checked and resolved into stages;
- `runner`: runs the stages, keeps OUTPUT/pipeline.json, writes the pipeline's report;
- `page`: the pipeline's HTML page (one row per stage, with links to each stage's own report);
- `registry`: the SQLite run registry.
"""
