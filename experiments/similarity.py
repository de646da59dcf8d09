"""Selection by gradient similarity to a target set (LESS), as static scores of the experiments.

* ``less``: the target is the whole validation split (``validation_fraction`` of the training split,
  held out from every strategy's training pool, :meth:`experiments.common.Context.replicate_split`);
* ``less_targeted``: the target is the validation examples of one slice (``less.slice_words``:
  snippets containing one of those words, e.g. negations), the setting LESS was made for.

Recipe (Xia et al. 2024, with a model trained from scratch instead of LoRA on a pretrained LM):
a warm-up model trains ``less.warmup_epochs`` epochs on a random ``less.warmup_fraction`` of the
pool, saving a checkpoint at the end of each epoch with the learning rate in effect then. At each
checkpoint, every pool example gets Adam-preconditioned Kronecker-projected gradient features
(:func:`prunejax.scores.gradient_features`, ``less.dim`` features) and every target example plain
gradient features (as LESS does); the score is :func:`prunejax.scores.less`, the learning-rate
weighted sum over checkpoints of the mean (``less.reduce``) cosine to the targets. High is kept.

Compute (example passes): the warm-up training, plus 3 passes (a forward and a backward) per pool
and target example per checkpoint.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from experiments import trainer
from experiments.slices import (  # noqa: F401 - re-exported: they lived here
    NEGATION_WORDS, _rotten_tomatoes_texts, slice_accuracy, slice_ids)
from prunejax import scores as scores_lib
from prunejax import select
from prunejax.errors import ConfigError

SCORES = ("less", "less_targeted")
"""The static scores this module computes (high = kept)."""



def check_config(config) -> None:
  """The ``less`` fields, when a LESS strategy runs."""
  from prunejax.errors import check_choice, check_positive_int, check_range
  if not any(s in SCORES for s in config.strategies):
    return
  lc = config.get("less")
  if lc is None:
    raise ConfigError("strategies 'less' and 'less_targeted' need a 'less' config section "
                      "(see experiments/configs/less_rotten_tomatoes.py)")
  check_range("validation_fraction", config.get("validation_fraction", 0.0), 0.0, 1.0,
              lo_open=True, hi_open=True)
  check_range("less.warmup_fraction", lc.warmup_fraction, 0.0, 1.0, lo_open=True)
  check_positive_int("less.warmup_epochs", lc.warmup_epochs)
  check_positive_int("less.dim", lc.dim)
  check_choice("less.reduce", lc.reduce, scores_lib.influence.REDUCTIONS)
  if "less_targeted" in config.strategies and not lc.slice_words:
    raise ConfigError("less.slice_words is empty; strategy 'less_targeted' needs the words that "
                      "define its slice")


def _variables_like(variables, tree):
  """``tree`` (shaped like ``variables["params"]``) as a pytree shaped like ``variables``."""
  out = jax.tree.map(lambda a: np.zeros(np.shape(a), np.float32), variables)
  out = dict(out)
  out["params"] = tree
  return out


@functools.lru_cache(maxsize=8)
def _features_fn(apply_fn, dim: int, adam: bool):
  if adam:
    return jax.jit(lambda v, b, k, s: scores_lib.gradient_features(apply_fn, v, b, k, dim=dim,
                                                                    adam_state=s))
  return jax.jit(lambda v, b, k: scores_lib.gradient_features(apply_fn, v, b, k, dim=dim))


def _epoch_learning_rates(ctx, num_ids: int, epochs: int) -> list[float]:
  """The mean learning rate of each epoch of a run on ``num_ids`` examples (LESS weighs each
  checkpoint by its epoch's average learning rate)."""
  from prunejax import online, train
  steps = online.FullData().steps_per_epoch(num_ids, ctx.config.train.batch_size)
  schedule = train.make_schedule(ctx.config.optimizer, steps, epochs)
  lrs = np.asarray(jax.vmap(schedule)(np.arange(steps * epochs)), np.float64)
  return [float(lrs[e * steps:(e + 1) * steps].mean()) for e in range(epochs)]


_POOL_CACHE: dict = {}
_POOL_CACHE_SIZE = 4  # pools (replicates) whose features are kept: less and less_targeted share them


def _copy(a):
  # Host copies: train steps donate the state's buffers.
  return np.array(a, copy=True)


def _pool_features(ctx, ids: np.ndarray, seed: int):
  """The warm-up run and the pool's Adam-preconditioned features at its checkpoints, computed
  once per (run, pool, seed) in this process: ``less`` and ``less_targeted`` differ only in
  their targets."""
  lc = ctx.config.less
  cache_key = (ctx.units.fingerprint, seed, len(ids), int(np.sum(ids, dtype=np.int64)))
  if cache_key in _POOL_CACHE:
    return _POOL_CACHE[cache_key]
  warm = select.select(ids, np.zeros(len(ids), np.float32), fraction=lc.warmup_fraction,
                       keep="random", seed=seed) if lc.warmup_fraction < 1 else ids
  checkpoints = []

  def on_epoch(epoch, state):
    try:  # LESS preconditions with Adam's moments; with another optimizer, plain gradients.
      moments = scores_lib.adam_moments(jax.tree.map(_copy, state.opt_state))
    except ConfigError:
      moments = None
    checkpoints.append((jax.tree.map(_copy, state.variables), moments))

  run = trainer.train_model(ctx, warm, seed=seed * 1000 + 7, epochs=lc.warmup_epochs,
                            desc="less warm-up", on_epoch=on_epoch)
  apply_fn = ctx.apply_fn(run.state.model)
  key = jax.random.key(seed)
  fp = _features_fn(apply_fn, int(lc.dim), False)
  train_feats = []
  for variables, moments in checkpoints:
    if moments is None:
      train_feats.append(trainer.map_ids(ctx, ids, lambda b, v=variables: fp(v, b, key)))
      continue
    adam = optax.ScaleByAdamState(count=np.zeros([], np.int32),
                                  mu=_variables_like(variables, moments[0]),
                                  nu=_variables_like(variables, moments[1]))
    fa = _features_fn(apply_fn, int(lc.dim), True)
    train_feats.append(trainer.map_ids(ctx, ids, lambda b, v=variables, s=adam: fa(v, b, key, s)))
  lrs = _epoch_learning_rates(ctx, len(warm), lc.warmup_epochs)
  while len(_POOL_CACHE) >= _POOL_CACHE_SIZE:  # N x dim floats per checkpoint each
    _POOL_CACHE.pop(next(iter(_POOL_CACHE)))
  _POOL_CACHE[cache_key] = (run.compute, len(checkpoints), train_feats, lrs, apply_fn,
                            checkpoints)
  return _POOL_CACHE[cache_key]


def less_scores(ctx, ids: np.ndarray, seed: int, *, targeted: bool = False
                ) -> tuple[np.ndarray, float]:
  """LESS similarity of the pool ``ids`` to the validation split (or its slice); returns
  ``(scores f32[N], compute in example passes)``, high = most similar = kept."""
  lc = ctx.config.less
  _, held, _ = ctx.replicate_split(0)
  if held is None or not len(held):
    raise ConfigError("strategy 'less' needs a validation split: set validation_fraction > 0")
  target = slice_ids(ctx, held, tuple(lc.slice_words)) if targeted else held
  if not len(target):
    raise ConfigError(f"less.slice_words={tuple(lc.slice_words)} match no validation example")
  run_compute, num_checkpoints, train_feats, lrs, apply_fn, checkpoints = _pool_features(
      ctx, ids, seed)
  key = jax.random.key(seed)
  fp = _features_fn(apply_fn, int(lc.dim), False)
  target_feats = [trainer.map_ids(ctx, target, lambda b, v=variables: fp(v, b, key))
                  for variables, _ in checkpoints]
  s = scores_lib.less(train_feats, target_feats, reduce=lc.reduce, learning_rates=lrs)
  # Each strategy is charged its whole recipe, also when it reused another's warm-up.
  compute = run_compute + 3.0 * num_checkpoints * (len(ids) + len(target))
  return np.asarray(s, np.float32), compute
