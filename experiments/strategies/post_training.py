"""``post_training``: magnitude, Wanda and SparseGPT on a trained model, no retraining."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from experiments import trainer
from experiments.context import Context
from experiments.files import save_mask, save_npz
from experiments.strategies import base
from experiments.strategies.base import Rows
from prunejax import masks, select


POST_TRAINING_METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATION_SETS = ("random", "el2n_hard", "el2n_easy")


def _pt_trained(ctx, r: int, ids, held, seed: int):
  """The trained dense model of replicate ``r`` (trained once, then restored from its checkpoint)
  and its ``dense`` row, which the ``dense`` strategy shares (same seed, same run)."""
  from prunejax.checkpoint import RoundCheckpoints
  from prunejax import online, parallel
  ckpt = RoundCheckpoints(ctx.workdir, f"post_training_r{r}")
  dense_row = ctx.units.get(f"dense_r{r}")
  init = base.init_params(ctx, seed)
  saved = ckpt.restore_latest({"trained": init})[1] if dense_row is not None else None
  if saved is None:
    run = trainer.train_model(ctx, ids, seed=seed, desc=f"post_training dense r{r}",
                              checkpoint=f"post_training_r{r}")
    dense_row = ctx.units.run(f"dense_r{r}", lambda: trainer.result_row(ctx, "dense", r, run,
                                                                        held))
    ckpt.save(0, {"trained": run.state.params})
    state = run.state
  else:
    state = trainer.initial_state(ctx, ids, seed=seed, epochs=ctx.config.train.epochs,
                                  pruner=online.FullData())
    state = state.replace(params=parallel.replicate(saved["trained"], ctx.mesh))
  ckpt.close()
  return state, dense_row


def _pt_calibration_sets(ctx, r: int, ids, seed: int, state) -> dict:
  """Calibration set name -> (ids, scoring compute): ``post_training.calibration_size`` training
  examples, random or the hardest / easiest by the trained model's EL2N; saved by id."""
  cfg = ctx.config.post_training
  n = min(cfg.calibration_size, len(ids))
  out, el2n = {}, None
  for name in cfg.calibration:
    if name == "random":
      chosen, cost = np.sort(np.random.default_rng(seed).choice(ids, n, replace=False)), 0.0
    else:
      if el2n is None:
        el2n = trainer.score_ids(ctx, state, ids, "el2n")
      chosen = select.select(ids, el2n, fraction=n / len(ids),
                             keep="hard" if name == "el2n_hard" else "easy")
      cost = float(len(ids))  # one forward pass over the training examples
    save_npz(os.path.join(ctx.workdir, "calibration", f"{name}_r{r}.npz"), ids=chosen)
    out[name] = (chosen, cost)
  return out


@functools.lru_cache(maxsize=16)
def _pt_apply_fn(model, preprocess):
  return lambda p, x: model.apply({"params": p}, preprocess.eval(x), train=False)


@functools.lru_cache(maxsize=4)
def _pt_token_mask(pad_id: int):
  return lambda x: x != pad_id


def _pt_label(method: str, sparsity, calibration: str | None) -> tuple[str, float]:
  """(method label, nominal sparsity) of a row; ``N:M`` keeps ``N`` of ``M``."""
  nm = isinstance(sparsity, str) and ":" in sparsity
  label = method + (f" {sparsity}" if nm else "")
  if calibration is not None:
    label += f" ({calibration} calibration)"
  nominal = 1 - int(sparsity.split(":")[0]) / int(sparsity.split(":")[1]) if nm else sparsity
  return label, float(nominal)


def _pt_prune(ctx, state, method: str, sparsity, calib_ids, filter_fn):
  """(mask, pruned params, calibration passes) of one method on the trained params."""
  from prunejax.masks import posttraining as pt
  cfg, params = ctx.config.post_training, state.params
  if method == "magnitude":
    if isinstance(sparsity, str):
      n, m = (int(v) for v in sparsity.split(":"))
      mask = masks.n_m(params, n, m, filter_fn=filter_fn)
    else:
      mask = masks.magnitude(params, sparsity, scope="layerwise", filter_fn=filter_fn)
    return mask, masks.apply_mask(params, mask), 0.0
  apply_fn = _pt_apply_fn(state.model, ctx.preprocess)
  batches = list(ctx.batches(calib_ids, batch_size=cfg.batch_size))
  pad = ctx.ds.meta.get("pad_id") if ctx.ds.meta else None
  kw = dict(sequential=cfg.sequential, filter_fn=filter_fn, mesh=ctx.mesh,
            token_mask_fn=None if pad is None else _pt_token_mask(int(pad)))
  layers = pt.linear_layers(apply_fn, params, batches[0]["x"], filter_fn=filter_fn)
  passes = pt.sequential_passes(layers, cfg.sequential)
  if method == "wanda":
    mask = pt.wanda(apply_fn, params, batches, sparsity, scope=cfg.wanda_scope, **kw)
    return mask, masks.apply_mask(params, mask), float(passes * len(calib_ids))
  mask, new = pt.sparsegpt(apply_fn, params, batches, sparsity, scope=cfg.sparsegpt_scope,
                           blocksize=cfg.blocksize, damp=cfg.damp, **kw)
  return mask, new, float(passes * len(calib_ids))


def _pt_unit(ctx, r, held, state, dense_row, method, sparsity, calibration, calib, err_batches):
  """One pruned model: its test accuracy, sparsity, cost and per-layer reconstruction errors."""
  import time
  from prunejax import parallel
  from prunejax.masks import posttraining as pt
  cfg = ctx.config.post_training
  filter_fn = masks.make_filter_fn(prune_head=cfg.prune_head, embeddings=False)
  calib_ids, select_cost = calib.get(calibration, (None, 0.0))
  t0 = time.perf_counter()
  mask, new, passes = _pt_prune(ctx, state, method, sparsity, calib_ids, filter_fn)
  jax.block_until_ready(new)
  seconds = time.perf_counter() - t0
  label, nominal = _pt_label(method, sparsity, calibration)
  save_mask(os.path.join(ctx.workdir, "masks", f"post_training_{method}_{sparsity}_"
                                f"{calibration or 'none'}_r{r}.npz".replace(":", "of")),
                    mask)
  errors = pt.layer_errors(_pt_apply_fn(state.model, ctx.preprocess), state.params, new,
                           err_batches, filter_fn=filter_fn, mesh=ctx.mesh,
                           token_mask_fn=_pt_token_mask(int(ctx.ds.meta["pad_id"]))
                           if ctx.ds.meta and "pad_id" in ctx.ds.meta else None)
  run = trainer.Run(state.replace(params=parallel.replicate(new, ctx.mesh)),
                    forward=dense_row["forward_examples"], backward=dense_row["backward_examples"],
                    steps=dense_row["steps"], wall=dense_row["wall_time"] + seconds)
  return trainer.result_row(
      ctx, "post_training", r, run, held, method=label, nominal_sparsity=nominal,
      sparsity=float(masks.sparsity_of(mask, filter_fn)), calibration=calibration or "none",
      scoring_compute=passes + select_cost, pruning_seconds=seconds, layer_errors=errors,
      mean_layer_error=float(np.mean(list(errors.values()))))


def _pt_keys(ctx, r: int) -> list[tuple]:
  cfg = ctx.config.post_training
  return [(m, sp, c, f"post_training_{m}_{sp}_{c or 'none'}_r{r}")
          for m in cfg.methods for sp in cfg.sparsities
          for c in ((None,) if m == "magnitude" else cfg.calibration)]


def post_training(ctx: Context) -> Rows:
  """Post-training pruning without retraining (``prunejax.masks.posttraining``).

  Per replicate: trains the dense model once (``model.checkpoint_dir`` fine-tunes a pretrained
  GPT-2), then prunes the trained weights at each of ``post_training.sparsities`` (fractions or
  ``"N:M"``) by magnitude (per layer; N:M per block), Wanda (``wanda_scope``, per output row by
  default) and SparseGPT (``sparsegpt_scope``, per layer), the latter two calibrated on each of
  ``post_training.calibration``: ``calibration_size`` random training examples, or the hardest
  or easiest by the trained model's EL2N (the ids are saved under ``calibration/``). Each row has
  the test accuracy of the pruned model, its sparsity, the calibration passes as scoring compute
  and every layer's relative reconstruction error on ``error_size`` random test examples
  (``layer_errors``); ``post_training.md`` tabulates them over replicates.
  """
  cfg = ctx.config.post_training
  rows, own_dense = [], "dense" not in ctx.config.strategies
  for r, ids, held, seed in base.replicates(ctx):
    keys = _pt_keys(ctx, r)
    if ctx.units.get(f"dense_r{r}") is None or any(ctx.units.get(k[-1]) is None for k in keys):
      state, dense_row = _pt_trained(ctx, r, ids, held, seed)
      calib = _pt_calibration_sets(ctx, r, ids, seed, state)
      err_ids = np.sort(np.random.default_rng(seed).choice(
          ctx.ds.test.ids, min(cfg.error_size, len(ctx.ds.test)), replace=False))
      save_npz(os.path.join(ctx.workdir, "calibration", f"error_ids_r{r}.npz"), ids=err_ids)
      err_batches = list(ctx.batches(err_ids, split="test", batch_size=cfg.batch_size))
      for method, sp, c, key in keys:
        ctx.units.run(key, lambda m=method, sp=sp, c=c: _pt_unit(
            ctx, r, held, state, dense_row, m, sp, c, calib, err_batches))
    rows += [ctx.units.get(f"dense_r{r}")] if own_dense else []
    rows += [ctx.units.get(k[-1]) for k in keys]
  _pt_write_table(ctx, rows)
  return rows


def _pt_write_table(ctx: Context, rows: Rows) -> None:
  """``post_training.md``: per method, sparsity and calibration set, the test accuracy (mean +-
  std over replicates), its paired drop from dense, and the mean and largest layer error."""
  from prunejax.fileio import atomic_write_text
  dense = {r: ctx.units.get(f"dense_r{r}")["test_accuracy"] for r in range(ctx.num_replicates)}
  groups: dict = {}
  for row in rows:
    if row["strategy"] == "post_training":
      groups.setdefault((row["method"], row["nominal_sparsity"]), []).append(row)
  lines = ["| method | sparsity | test acc % | loss vs dense (points) | mean layer error | "
           "max layer error | n |", "|---|---|---|---|---|---|---|"]
  for (method, sp), rs in groups.items():
    acc = np.array([x["test_accuracy"] for x in rs]) * 100
    drop = np.array([100 * (dense[x["replicate"]] - x["test_accuracy"]) for x in rs
                     if x["replicate"] in dense])
    err = np.array([x["mean_layer_error"] for x in rs])
    worst = max(max(x["layer_errors"].values()) for x in rs)
    sd = lambda v: f" +- {v.std(ddof=1):.2f}" if len(v) > 1 else ""
    lines.append(f"| {method} | {sp:g} | {acc.mean():.2f}{sd(acc)} | "
                 f"{drop.mean():.2f}{sd(drop) if len(drop) else ''} | {err.mean():.4f} | "
                 f"{worst:.4f} | {len(rs)} |")
  if jax.process_index() == 0:
    atomic_write_text(os.path.join(ctx.workdir, "post_training.md"), "\n".join(lines) + "\n")
