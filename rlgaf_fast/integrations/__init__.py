"""Adapters that route other training libraries' log-probability computations through rlgaf_fast.

Each adapter imports its library lazily, so ``import rlgaf_fast`` works without it installed.
``rlgaf_fast.integrations.trl``: TRL's GRPOTrainer.
"""
