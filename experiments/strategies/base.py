"""What every strategy shares: its replicates, the units of work of replicas of one setting, the
compute unit, and the inputs of mask methods (the prunable-leaf filter, initial params, a batch).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import jax
import numpy as np

from experiments import trainer
from experiments.context import Context
from prunejax import masks

Rows = list[dict]


def replicates(ctx: Context) -> Iterator[tuple[int, np.ndarray, np.ndarray | None, int]]:
  """``(r, train ids, held-out ids or None, seed)`` of each replicate."""
  for r in range(ctx.num_replicates):
    yield (r,) + ctx.replicate_split(r)


def split_and_seed(ctx: Context, r: int) -> tuple[np.ndarray, int]:
  """(train ids, seed) of replicate ``r``."""
  ids, _, seed = ctx.replicate_split(r)
  return ids, seed


def baseline_compute(ctx: Context) -> float:
  """Compute of one full-data training run (example passes), the unit of every compute ratio."""
  ids, _, _ = ctx.replicate_split(0)
  return 3.0 * len(ids) * ctx.config.train.epochs


def replica_units(ctx: Context, prefix: str, keys: list[str],
                  train: Callable[[list[int], str], list[trainer.Run]],
                  row: Callable[[int, trainer.Run], dict]) -> Rows:
  """Units ``keys`` whose training runs are replicas of one setting: the unfinished ones train
  together (``train(todo, checkpoint_key) -> runs``, one program where
  :func:`trainer.train_models` can) and unit ``keys[j]`` records ``row(j, run)``. A rerun trains
  only the replicas whose unit is not finished; the group's mid-run checkpoint key names them."""
  todo = [j for j, k in enumerate(keys) if ctx.units.get(k) is None]
  # One replica left: its checkpoint is keyed by its unit, as a run of its own always was.
  group_key = keys[todo[0]] if len(todo) == 1 else f"{prefix}_g{'-'.join(map(str, todo))}"
  runs = dict(zip(todo, train(todo, group_key))) if todo else {}
  return [ctx.units.run(k, lambda j=j: row(j, runs[j])) for j, k in enumerate(keys)]


# ----------------------------------------------------------------------------------------------
# Inputs of mask methods (lottery tickets, pruning at initialization).
# ----------------------------------------------------------------------------------------------


def filter_fn(ctx: Context):
  """The prunable leaves (``imp.prune_head``: the classification head too)."""
  return masks.make_filter_fn(prune_head=ctx.config.imp.prune_head)


def init_params(ctx: Context, seed: int):
  """The initial params of a run seeded by ``seed`` (a pretrained checkpoint's when the config
  has one)."""
  from prunejax.models import init_variables
  variables = ctx.initial_variables(seed) or init_variables(
      ctx.model(), jax.random.key(seed), ctx.preprocess.eval(ctx.x_example))
  return variables["params"]


def mask_inputs(ctx: Context, ids: np.ndarray, seed: int, needs: tuple[str, ...]) -> masks.MaskInputs:
  """What a mask method needs: a batch of ``train.batch_size`` training examples among ``ids``
  (normalized), an ``apply_fn`` over the params alone, a key, the input shape."""
  inputs = masks.MaskInputs(key=jax.random.key(seed),
                            input_shape=(1,) + ctx.preprocess.eval(ctx.x_example).shape[1:])
  if "apply_fn" in needs:
    inputs.apply_fn = _params_apply_fn(ctx.model())
  if "batch" in needs:
    chosen = np.random.default_rng(seed).choice(ids, min(len(ids), ctx.config.train.batch_size),
                                                replace=False)
    host = next(iter(ctx.batches(chosen, batch_size=len(chosen))))
    inputs.batch = {"x": ctx.preprocess.eval(host["x"]), "y": host["y"], "mask": host["mask"]}
  return inputs


@functools.lru_cache(maxsize=16)
def _params_apply_fn(model):
  return lambda p, x: model.apply({"params": p}, x, train=False)
