"""``joint``: data and weights pruned in the same run: IMP whose every training run prunes its data
online with the pruner ``joint.data`` (one of :data:`ONLINE_PRUNERS`)."""

from __future__ import annotations

from experiments.context import Context
from experiments.strategies.base import Rows
from experiments.strategies.lottery import imp


def joint(ctx: Context) -> Rows:
  """IMP (``experiments/strategies/lottery.py``) with the online data pruner ``joint.data``; its
  rows are named ``joint``."""
  return imp(ctx, data_strategy=ctx.config.joint.data, strategy="joint")
