"""Rewards for online RL: the `Scorer` interface (`scorer.py`), which rule-based verifiers (`verifiers.py`),
IFEval's checker (`ifeval.py`) and reward models (`reward_model.py`) implement."""
