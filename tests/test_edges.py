"""The edges harness: every registered score, mask method and online pruner, the ``dedup`` functions
and the post-training functions, fed as outside code would feed them.

Cases (:data:`CASES`): rows in another order (the answer by id must be the same), NaN or inf in
float inputs (and on padding rows, which must change nothing), labels and ids out of range, the
wrong dtype, the wrong shape, and empty inputs. Each subject gives the right answer (checked
against the clean call) or one prunejax error (a one-line :class:`~prunejax.errors.PrunejaxError`
naming the field); anything else fails. A case a subject cannot receive (no labels, no ids) is
``n/a`` and says why.

Subjects come from the registries: ``prunejax.scores.SCORES`` (per-batch scores, trackers and
dataset scores), ``prunejax.masks.METHODS``, every subclass of ``prunejax.online.OnlinePruner``,
and the public functions of ``prunejax.dedup`` and ``prunejax.masks.posttraining``. A new entry
joins automatically; a new dataset score, dedup or post-training function without inputs here
fails :func:`test_every_public_function_is_in_the_harness` until it is given them.

``PYTHONPATH=. python tests/test_edges.py`` (from the repository root) prints the function x case
table (BUILD_NOTES / NOTES_ISSUE_25).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import dedup, masks, online, scores
from prunejax.errors import PrunejaxError
from prunejax.masks import posttraining as pt
from prunejax.scores.registry import SCORES

CASES = ("permuted", "nan_inf", "nan_on_padding", "label_out_of_range", "id_out_of_range",
         "wrong_dtype", "wrong_shape", "empty")
CORRECT, ERROR = "correct", "clean error"

D, H, C, B = 6, 8, 3, 10
_RNG = np.random.default_rng(0)
PARAMS = {"dense1": {"kernel": jnp.asarray(_RNG.normal(size=(D, H)) / np.sqrt(D), jnp.float32),
                     "bias": jnp.asarray(0.1 * _RNG.normal(size=H), jnp.float32)},
          "head": {"kernel": jnp.asarray(_RNG.normal(size=(H, C)) / np.sqrt(H), jnp.float32),
                   "bias": jnp.zeros((C,), jnp.float32)}}


def apply_fn(params, x):
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  return h @ params["head"]["kernel"] + params["head"]["bias"]


def make_batch(b: int = B, seed: int = 1) -> dict:
  """A batch with padding on both sides (rows 0 and b-1) and sparse ids."""
  rng = np.random.default_rng(seed)
  mask = np.ones(b, bool)
  if b >= 4:
    mask[[0, b - 1]] = False
  return {"x": rng.normal(size=(b, D)).astype(np.float32),
          "y": rng.integers(0, C, b).astype(np.int32),
          "id": (1000 + 7 * rng.permutation(b)).astype(np.int64), "mask": mask}


PERM = np.random.default_rng(5).permutation(B)
BAD_ROWS = [2, 3]  # real rows that get NaN/inf or bad labels


def _permute(batch: dict, perm=PERM) -> dict:
  return {k: np.asarray(v)[perm] for k, v in batch.items()}


def _nan(batch: dict, rows=BAD_ROWS) -> dict:
  x = batch["x"].copy()
  x[rows[0], 0] = np.nan
  x[rows[1], 1] = np.inf
  return dict(batch, x=x)


def _check_error(e: BaseException) -> str:
  assert isinstance(e, PrunejaxError), f"not a prunejax error: {type(e).__name__}: {e}"
  assert str(e) and "\n" not in str(e), f"not one line: {e!r}"
  return ERROR


def _attempt(fn: Callable[[], Any]) -> tuple[str, Any]:
  try:
    return CORRECT, fn()
  except Exception as e:  # noqa: BLE001 - classified here.
    return _check_error(e), None


def _tree_close(a, b, rtol=1e-5, atol=1e-6) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == bool:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


class NA(Exception):
  """This case cannot be given to this subject (the message says why)."""


# ----------------------------------------------------------------------------------------------
# Per-batch scores: fn(apply_fn, params, batch) -> f32[B].
# ----------------------------------------------------------------------------------------------


def _batch_score_case(name: str, case: str) -> str:
  spec = SCORES[name]
  call = lambda batch: np.asarray(spec(apply_fn, PARAMS, batch))
  batch = make_batch()
  clean = call(batch)
  assert clean.shape == (B,) and clean.dtype == np.float32
  real = batch["mask"]
  assert (clean[~real] == 0).all() and np.isfinite(clean[real]).all()
  uses_labels = not np.array_equal(
      clean, call(dict(batch, y=(batch["y"] + 1) % C)), equal_nan=True)
  if case == "permuted":
    np.testing.assert_allclose(call(_permute(batch)), clean[PERM], rtol=1e-5, atol=1e-6)
    return CORRECT
  if case in ("nan_inf", "nan_on_padding"):
    rows = BAD_ROWS if case == "nan_inf" else [0, B - 1]
    bad = _nan(batch, rows)
    status, got = _attempt(lambda: call(bad))
    if status == CORRECT:  # the other rows unchanged; padding rows 0
      others = np.setdiff1d(np.arange(B), rows)
      np.testing.assert_allclose(got[others], clean[others], rtol=1e-5, atol=1e-6)
      if case == "nan_inf":  # a row the model turns into non-finite logits: never a number
        _check_bad_rows(got[rows], apply_fn(PARAMS, jnp.asarray(bad["x"]))[np.asarray(rows)])
      else:
        assert (got[rows] == 0).all()
    return status
  if case == "label_out_of_range":
    y = batch["y"].copy()
    y[BAD_ROWS] = [C, -1]
    status, got = _attempt(lambda: call(dict(batch, y=y)))
    if status == CORRECT:
      others = np.setdiff1d(np.arange(B), BAD_ROWS)
      np.testing.assert_allclose(got[others], clean[others], rtol=1e-5, atol=1e-6)
      if uses_labels:
        assert np.isnan(got[BAD_ROWS]).all(), got[BAD_ROWS]
      else:
        np.testing.assert_allclose(got, clean, rtol=1e-6)
    return status
  if case == "id_out_of_range":  # ids are not read by a per-batch score: nothing may change.
    ids = batch["id"].copy()
    ids[BAD_ROWS] = [2**31 + 5, -2**40]
    np.testing.assert_array_equal(call(dict(batch, id=ids)), clean)
    return CORRECT
  if case == "wrong_dtype":
    for bad in (dict(batch, y=batch["y"].astype(np.float32)),
                dict(batch, mask=batch["mask"].astype(np.float32))):
      status, got = _attempt(lambda: call(bad))
      if status == CORRECT:  # only a score that reads neither may answer
        assert not uses_labels or "y" not in bad or bad["y"].dtype != np.float32
        np.testing.assert_allclose(got, clean, rtol=1e-6)
    return ERROR if uses_labels else status
  if case == "wrong_shape":
    for bad in (dict(batch, y=batch["y"][:-1]), dict(batch, mask=batch["mask"][:-1]),
                dict(batch, x=batch["x"][:, :-1])):
      _check_error(_raises(lambda: call(bad)))
    return ERROR
  if case == "empty":
    got = call({k: v[:0] for k, v in batch.items()})
    assert got.shape == (0,) and got.dtype == np.float32
    return CORRECT
  raise AssertionError(case)


def _check_bad_rows(values, logits) -> None:
  """Rows given NaN/inf inputs: non-finite where the model's logits are (never a plausible
  number). Where the model absorbed the inf (tanh(inf) = 1 is a real output) a score of the
  logits is a real number, and one that also reads the input (a gradient norm: d/dW of x W with x
  = inf) is inf or NaN; both are what the function computes."""
  finite_logits = np.isfinite(np.asarray(logits)).all(axis=-1)
  assert not np.isfinite(values[~finite_logits]).any(), (values, finite_logits)
  assert finite_logits.any() and (~finite_logits).any()  # the case exercises both kinds of row


def _raises(fn) -> BaseException:
  try:
    fn()
  except Exception as e:  # noqa: BLE001
    return e
  raise AssertionError("no error raised where one was required")


# ----------------------------------------------------------------------------------------------
# Trackers: init(ids), update(state, batch, logits), read.
# ----------------------------------------------------------------------------------------------


def _tracker_case(name: str, case: str) -> str:
  spec = SCORES[name]
  tracker = spec.tracker()
  batch = make_batch()
  all_ids = np.sort(np.r_[batch["id"], 5000, 5007])  # two ids never presented

  def run(b, ids=all_ids, logits=None):
    state = tracker.init(ids)
    lg = apply_fn(PARAMS, jnp.asarray(b["x"])) if logits is None else logits
    for _ in range(2):
      state = tracker.update(state, {k: jnp.asarray(v) for k, v in b.items()}, lg)
    return np.asarray(spec.read_tracker(state))

  clean = run(batch)
  assert clean.shape == (len(all_ids),)
  if case == "permuted":
    np.testing.assert_allclose(run(_permute(batch)), clean, rtol=1e-6)
    return CORRECT
  if case in ("nan_inf", "nan_on_padding"):
    rows = BAD_ROWS if case == "nan_inf" else [0, B - 1]
    bad = _nan(batch, rows)
    status, got = _attempt(lambda: run(bad))
    if status == CORRECT:
      pos = np.searchsorted(all_ids, batch["id"][rows])
      others = np.setdiff1d(np.arange(len(all_ids)), pos)
      np.testing.assert_allclose(got[others], clean[others], rtol=1e-6)
      if case == "nan_inf":
        _check_bad_rows(got[pos], apply_fn(PARAMS, jnp.asarray(bad["x"]))[np.asarray(rows)])
      else:
        np.testing.assert_allclose(got, clean, rtol=1e-6)
    return status
  if case == "label_out_of_range":
    y = batch["y"].copy()
    y[BAD_ROWS] = [C, -1]
    status, got = _attempt(lambda: run(dict(batch, y=y)))
    if status == CORRECT:
      pos = np.searchsorted(all_ids, batch["id"][BAD_ROWS])
      others = np.setdiff1d(np.arange(len(all_ids)), pos)
      np.testing.assert_allclose(got[others], clean[others], rtol=1e-6)
      assert not np.isfinite(got[pos]).any(), got[pos]
    return status
  if case == "id_out_of_range":
    # Ids the state does not hold are dropped; ids beyond int32 are refused at init.
    ids = batch["id"].copy()
    ids[BAD_ROWS] = [123, 456]
    got = run(dict(batch, id=ids))
    pos = np.searchsorted(all_ids, batch["id"][BAD_ROWS])
    ref = run(dict(batch, mask=batch["mask"] & ~np.isin(np.arange(B), BAD_ROWS)))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert not np.allclose(got[pos], clean[pos]) or np.allclose(ref[pos], clean[pos])
    _check_error(_raises(lambda: tracker.init(np.r_[all_ids, 2**32 + 5])))
    return CORRECT
  if case == "wrong_dtype":
    _check_error(_raises(lambda: tracker.init(all_ids.astype(np.float64) + 0.5)))
    return ERROR
  if case == "wrong_shape":
    _check_error(_raises(lambda: tracker.init(all_ids.reshape(2, -1))))
    _check_error(_raises(lambda: run(dict(batch, y=batch["y"][:-1]))))
    return ERROR
  if case == "empty":
    state = tracker.init(np.zeros(0, np.int64))
    assert np.asarray(spec.read_tracker(state)).shape == (0,)
    return CORRECT
  raise AssertionError(case)


# ----------------------------------------------------------------------------------------------
# Dataset scores (no per-batch fn in the registry): how each is called on N examples.
# ----------------------------------------------------------------------------------------------

N = 40
_EMB = np.random.default_rng(3).normal(size=(N, 5))
_EMB[:3] += 8.0  # a few outliers
_IDS = (np.random.default_rng(4).permutation(10**6)[:N]).astype(np.int64)
_LABELS = np.random.default_rng(6).integers(0, C, N)
_LOGITS = np.random.default_rng(7).normal(size=(N, C)).astype(np.float32)
_PROBS = np.exp(_LOGITS - _LOGITS.max(1, keepdims=True))
_PROBS /= _PROBS.sum(1, keepdims=True)

DATASET_SCORES: dict[str, Callable[..., np.ndarray]] = {
    # f(rows, ids, labels) -> f32[N] aligned with the rows.
    "prototypes": lambda e, ids, y: np.asarray(scores.prototypes(
        e, num_clusters=3, key=jax.random.key(0), ids_N=ids)),
    "knn_outlier": lambda e, ids, y: np.asarray(scores.knn_outlier_score(e, 5, ids_N=ids)),
    "self_confidence": lambda p, ids, y: np.asarray(scores.self_confidence(p, y)),
    "normalized_margin": lambda p, ids, y: np.asarray(scores.normalized_margin(p, y)),
}
_PROB_SCORES = ("self_confidence", "normalized_margin")


def _dataset_score_case(name: str, case: str) -> str:
  fn = DATASET_SCORES[name]
  rows = _PROBS if name in _PROB_SCORES else _EMB
  clean = fn(rows, _IDS, _LABELS)
  assert clean.shape == (N,) and np.isfinite(clean).all()
  perm = np.random.default_rng(8).permutation(N)
  if case == "permuted":
    np.testing.assert_allclose(fn(rows[perm], _IDS[perm], _LABELS[perm]), clean[perm],
                               rtol=1e-5, atol=1e-6)
    return CORRECT
  if case == "nan_inf":
    bad = rows.copy()
    bad[2, 0], bad[5, 1] = np.nan, np.inf
    _check_error(_raises(lambda: fn(bad, _IDS, _LABELS)))
    return ERROR
  if case == "nan_on_padding":
    raise NA("no padding rows: a dataset score takes the examples themselves")
  if case == "label_out_of_range":
    if name not in _PROB_SCORES:
      raise NA("takes no labels")
    y = _LABELS.copy()
    y[[1, 4]] = [C, -1]
    _check_error(_raises(lambda: fn(rows, _IDS, y)))
    return ERROR
  if case == "id_out_of_range":
    if name in _PROB_SCORES:
      raise NA("takes no ids")
    ids = _IDS + 2**40  # host-side: 64-bit ids are fine, the answer by row is unchanged
    np.testing.assert_allclose(fn(rows, ids, _LABELS), clean, rtol=1e-6)
    dup = _IDS.copy()
    dup[1] = dup[0]
    _check_error(_raises(lambda: fn(rows, dup, _LABELS)))
    return CORRECT
  if case == "wrong_dtype":
    if name in _PROB_SCORES:
      _check_error(_raises(lambda: fn(rows, _IDS, _LABELS.astype(np.float64) + 0.5)))
    else:
      _check_error(_raises(lambda: fn(rows, _IDS.astype(np.float64) + 0.5, _LABELS)))
    return ERROR
  if case == "wrong_shape":
    _check_error(_raises(lambda: fn(rows[:, :, None], _IDS, _LABELS)))
    _check_error(_raises(lambda: fn(rows, _IDS[:-1], _LABELS[:-1])
                         if name not in _PROB_SCORES else fn(rows, _IDS, _LABELS[:-1])))
    return ERROR
  if case == "empty":
    _check_error(_raises(lambda: fn(rows[:0], _IDS[:0], _LABELS[:0])))
    return ERROR
  raise AssertionError(case)


# ----------------------------------------------------------------------------------------------
# Mask methods: METHODS[name].mask(params, sparsity, MaskInputs(...)).
# ----------------------------------------------------------------------------------------------


def _inputs(batch):
  return masks.MaskInputs(apply_fn=apply_fn, batch=batch, key=jax.random.key(0),
                          input_shape=(2, D))


def _mask_case(name: str, case: str) -> str:
  method = masks.METHODS[name]
  call = lambda batch, params=PARAMS: method.mask(params, 0.5, _inputs(batch))
  batch = make_batch()
  clean = call(batch)
  if case == "permuted":
    if method.data_free:
      raise NA("reads no batch")
    got = call(_permute(batch))
    _tree_close(method.scores(PARAMS, _inputs(_permute(batch))),
                method.scores(PARAMS, _inputs(batch)), rtol=1e-4, atol=1e-7)
    _tree_close(got, clean)
    return CORRECT
  if case == "nan_inf":
    nan_params = jax.tree.map(lambda p: p, PARAMS)
    nan_params["dense1"]["kernel"] = nan_params["dense1"]["kernel"].at[0, 0].set(jnp.nan)
    _check_error(_raises(lambda: call(batch, nan_params)))
    if not method.data_free:
      _check_error(_raises(lambda: call(_nan(batch))))
    return ERROR
  if case == "nan_on_padding":
    if method.data_free:
      raise NA("reads no batch")
    _tree_close(call(_nan(batch, [0, B - 1])), clean)
    return CORRECT
  if case == "label_out_of_range":
    if method.data_free:
      raise NA("reads no batch")
    y = batch["y"].copy()
    y[BAD_ROWS] = [C, -1]
    status, got = _attempt(lambda: call(dict(batch, y=y)))
    if status == CORRECT:  # only a method that does not read labels may answer: the same mask.
      _tree_close(got, clean)
      _tree_close(call(dict(batch, y=(batch["y"] + 1) % C)), clean)
    return status
  if case == "id_out_of_range":
    if method.data_free:
      raise NA("reads no batch")
    ids = batch["id"].copy()
    ids[BAD_ROWS] = [2**31 + 5, -2**40]
    _tree_close(call(dict(batch, id=ids)), clean)  # ids are not read by a mask method
    return CORRECT
  if case == "wrong_dtype":
    bad = jax.tree.map(lambda p: p.astype(jnp.int32), PARAMS)
    status, got = _attempt(lambda: call(batch, bad))
    if status == CORRECT:  # integer weights are pruned as their values say: same structure.
      assert jax.tree.structure(got) == jax.tree.structure(PARAMS)
    if not method.data_free:
      status2, got2 = _attempt(lambda: call(dict(batch, y=batch["y"].astype(np.float32))))
      if status2 == CORRECT:
        _tree_close(got2, clean)
      _check_error(_raises(lambda: call(dict(batch, mask=batch["mask"].astype(np.float32)))))
      return ERROR
    return status
  if case == "wrong_shape":
    if method.data_free and name != "synflow":
      raise NA("reads no batch or input shape")
    if name == "synflow":
      _check_error(_raises(lambda: method.mask(PARAMS, 0.5, dataclasses.replace(
          _inputs(batch), input_shape=(2, D + 1)))))
    else:
      _check_error(_raises(lambda: call(dict(batch, x=batch["x"][:, :-1]))))
      _check_error(_raises(lambda: call(dict(batch, y=batch["y"][:-1]))))
    return ERROR
  if case == "empty":
    _check_error(_raises(lambda: method.mask({}, 0.5, _inputs(batch))))
    if not method.data_free:
      _check_error(_raises(lambda: call({k: v[:0] for k, v in batch.items()})))
    return ERROR
  raise AssertionError(case)


# ----------------------------------------------------------------------------------------------
# Online pruners: every subclass of OnlinePruner, with its defaults.
# ----------------------------------------------------------------------------------------------


def _pruner_classes() -> dict[str, type]:
  out, todo = {}, [online.OnlinePruner]
  while todo:
    cls = todo.pop()
    out[cls.name] = cls
    todo.extend(cls.__subclasses__())
  return out


PRUNERS = _pruner_classes()


def _pruner(name: str):
  pruner = PRUNERS[name]()
  if name == "batch" and pruner.score == "reducible_loss":
    pruner = pruner.with_irreducible_loss(_PIDS, np.linspace(0, 1, len(_PIDS)))
  return pruner


_PIDS = (np.random.default_rng(9).permutation(10**6)[:30] + 3).astype(np.int64)


def _plan_by_id(plan) -> dict:
  return {int(i): {k: float(np.asarray(v)[j]) for k, v in plan.columns.items()}
          for j, i in enumerate(plan.ids)}


def _pruner_case(name: str, case: str) -> str:
  pruner = _pruner(name)
  state = pruner.init(_PIDS)
  plan = lambda ids, st=state: pruner.plan(st, ids, seed=3, epoch=1, num_epochs=4)
  clean = plan(_PIDS)
  assert set(clean.ids.tolist()) <= set(_PIDS.tolist())
  if case == "permuted":
    perm = np.random.default_rng(1).permutation(len(_PIDS))
    assert _plan_by_id(plan(_PIDS[perm], pruner.init(_PIDS[perm]))) == _plan_by_id(clean)
    return CORRECT
  if case in ("nan_inf", "nan_on_padding", "label_out_of_range"):
    raise NA("plans over ids only; the step's losses are masked like any train step")
  if case == "id_out_of_range":
    _check_error(_raises(lambda: plan(np.r_[_PIDS, 2**32 + 1], pruner.init(
        np.r_[_PIDS, 2**32 + 1]))))
    return ERROR
  if case == "wrong_dtype":
    _check_error(_raises(lambda: plan(_PIDS.astype(np.float64) + 0.5)))
    return ERROR
  if case == "wrong_shape":
    _check_error(_raises(lambda: plan(_PIDS.reshape(2, -1))))
    dup = _PIDS.copy()
    dup[1] = dup[0]
    _check_error(_raises(lambda: plan(dup)))
    return ERROR
  if case == "empty":
    status, got = _attempt(lambda: plan(np.zeros(0, np.int64), pruner.init(np.zeros(0, np.int64))))
    if status == CORRECT:
      assert len(got.ids) == 0
    return status
  raise AssertionError(case)


# ----------------------------------------------------------------------------------------------
# dedup: each public function with the inputs it takes.
# ----------------------------------------------------------------------------------------------

_TEXTS = ["the cat sat on the mat today", "The  cat sat on the mat today", "a dog ran far away",
          "the cat sat on the mat today!", "something else entirely here", "a dog ran far away."]
_TIDS = np.array([50, 7, 2**40, -1, 3, 999], np.int64)  # host-side ids: any int64
_IMG = np.random.default_rng(2).integers(0, 255, (6, 2, 2)).astype(np.uint8)
_IMG[4] = _IMG[1]


def _groups_by_id(groups) -> list:
  return sorted(sorted(np.asarray(g).tolist()) for g in groups)


def _hash(kind="image"):
  return dedup.content_hashes(_IMG, kind=kind)


def _semdedup(e, ids, **kw):
  return dedup.semdedup(e, ids_N=ids, num_clusters=3, key=jax.random.key(0), **kw)


DEDUP: dict[str, Callable[[str], str]] = {}


def _dedup_subject(name):
  def register(fn):
    DEDUP[name] = fn
    return fn
  return register


@_dedup_subject("exact_duplicates")
def _exact(case):
  h = _hash()
  clean = _groups_by_id(dedup.exact_duplicates(_TIDS, h))
  assert clean == [sorted([int(_TIDS[1]), int(_TIDS[4])])]
  perm = np.array([5, 3, 1, 0, 4, 2])
  if case == "permuted":
    assert _groups_by_id(dedup.exact_duplicates(_TIDS[perm], h[perm])) == clean
    return CORRECT
  if case == "id_out_of_range":
    assert _groups_by_id(dedup.exact_duplicates(_TIDS + 2**41, h)) == [
        sorted([int(_TIDS[1]) + 2**41, int(_TIDS[4]) + 2**41])]
    _check_error(_raises(lambda: dedup.exact_duplicates(np.r_[_TIDS[:5], _TIDS[0]], h)))
    return CORRECT
  if case == "wrong_dtype":
    _check_error(_raises(lambda: dedup.exact_duplicates(_TIDS + 0.5, h)))
    _check_error(_raises(lambda: dedup.exact_duplicates(_TIDS, h.astype("S8"))))
    return ERROR
  if case == "wrong_shape":
    _check_error(_raises(lambda: dedup.exact_duplicates(_TIDS[:-1], h)))
    return ERROR
  if case == "empty":
    status, got = _attempt(lambda: dedup.exact_duplicates(_TIDS[:0], h[:0]))
    assert status == ERROR or got == []
    return status
  raise NA("takes digests: no floats or labels")


@_dedup_subject("leakage")
def _leak(case):
  h = _hash()
  test_ids, test_h = np.array([7000, 7001]), h[[1, 2]]
  clean = dedup.leakage(_TIDS, h, test_ids, test_h)
  flat = lambda r: sorted(map(repr, jax.tree.leaves(jax.tree.map(
      lambda a: np.asarray(a).tolist(), r))))
  if case == "permuted":
    perm = np.array([5, 3, 1, 0, 4, 2])
    got = dedup.leakage(_TIDS[perm], h[perm], test_ids[::-1], test_h[::-1])
    assert flat(got) == flat(clean), (got, clean)
    return CORRECT
  if case == "id_out_of_range":
    _check_error(_raises(lambda: dedup.leakage(np.r_[_TIDS[:5], _TIDS[0]], h, test_ids, test_h)))
    return ERROR
  if case == "wrong_dtype":
    _check_error(_raises(lambda: dedup.leakage(_TIDS + 0.5, h, test_ids, test_h)))
    return ERROR
  if case == "wrong_shape":
    _check_error(_raises(lambda: dedup.leakage(_TIDS, h, test_ids[:1], test_h)))
    return ERROR
  if case == "empty":
    status, got = _attempt(lambda: dedup.leakage(_TIDS, h, test_ids[:0], test_h[:0]))
    if status == CORRECT:
      assert not any(len(np.asarray(a)) for a in jax.tree.leaves(got))
    return status
  raise NA("takes digests: no floats or labels")


@_dedup_subject("semdedup")
def _sem(case):
  e = np.random.default_rng(11).normal(size=(30, 4))
  e[7] = e[3] * 2.0
  ids = (np.random.default_rng(12).permutation(10**6)[:30]).astype(np.int64)
  clean = _semdedup(e, ids)
  assert int(ids[7]) in clean.removed_ids(0.01) or int(ids[3]) in clean.removed_ids(0.01)
  if case == "permuted":
    perm = np.random.default_rng(13).permutation(30)
    got = _semdedup(e[perm], ids[perm])
    for eps in (0.01, 0.2):
      np.testing.assert_array_equal(got.removed_ids(eps), clean.removed_ids(eps))
    np.testing.assert_array_equal(got.duplicate_of, clean.duplicate_of[perm])
    return CORRECT
  if case == "nan_inf":
    bad = e.copy()
    bad[4, 1] = np.inf
    _check_error(_raises(lambda: _semdedup(bad, ids)))
    return ERROR
  if case == "id_out_of_range":
    got = _semdedup(e, ids + 2**40)  # host-side: 64-bit ids keep their answer
    np.testing.assert_array_equal(got.removed_ids(0.2), clean.removed_ids(0.2) + 2**40)
    _check_error(_raises(lambda: _semdedup(e, np.r_[ids[:-1], ids[0]])))
    return CORRECT
  if case == "label_out_of_range":  # the labels SemDeDup takes are precomputed clusters
    _check_error(_raises(lambda: _semdedup(e, ids, clusters_N=np.r_[np.zeros(29, int), -1])))
    return ERROR
  if case == "wrong_dtype":
    _check_error(_raises(lambda: _semdedup(e, ids + 0.5)))
    _check_error(_raises(lambda: _semdedup(e, ids, clusters_N=np.zeros(30) + 0.5)))
    return ERROR
  if case == "wrong_shape":
    _check_error(_raises(lambda: _semdedup(e[:, :, None], ids)))
    _check_error(_raises(lambda: _semdedup(e, ids[:-1])))
    return ERROR
  if case == "empty":
    _check_error(_raises(lambda: _semdedup(e[:0], ids[:0])))
    return ERROR
  raise NA("no padding rows")


@_dedup_subject("minhash_duplicates")
def _minhash(case):
  call = lambda ids, texts: _groups_by_id(dedup.minhash_duplicates(ids, texts, threshold=0.5))
  clean = call(_TIDS, _TEXTS)
  assert clean, clean
  if case == "permuted":
    perm = np.array([5, 3, 1, 0, 4, 2])
    assert call(_TIDS[perm], [_TEXTS[i] for i in perm]) == clean
    return CORRECT
  if case == "id_out_of_range":
    _check_error(_raises(lambda: call(np.r_[_TIDS[:5], _TIDS[0]], _TEXTS)))
    return ERROR
  if case == "wrong_dtype":
    _check_error(_raises(lambda: call(_TIDS + 0.5, _TEXTS)))
    _check_error(_raises(lambda: call(_TIDS, [1, 2, 3, 4, 5, 6])))
    return ERROR
  if case == "wrong_shape":
    _check_error(_raises(lambda: call(_TIDS[:-1], _TEXTS)))
    return ERROR
  if case == "empty":
    status, got = _attempt(lambda: call(_TIDS[:0], []))
    if status == CORRECT:
      assert got == []
    return status
  raise NA("takes texts: no floats or labels")


@_dedup_subject("content_hashes")
def _content(case):
  clean = dedup.content_hashes(_IMG, kind="image")
  if case == "permuted":
    perm = np.array([5, 3, 1, 0, 4, 2])
    np.testing.assert_array_equal(dedup.content_hashes(_IMG[perm], kind="image"), clean[perm])
    return CORRECT
  if case == "nan_inf":  # NaN is content like any other: hashed by its bytes, row by row.
    f = _IMG.astype(np.float32)
    f[2, 0, 0] = np.nan
    got = dedup.content_hashes(f, kind="image")
    assert got[2] != dedup.content_hashes(_IMG.astype(np.float32), kind="image")[2]
    assert got[1] == got[4]
    return CORRECT
  if case == "wrong_dtype":
    _check_error(_raises(lambda: dedup.content_hashes(np.ones((2, 3)), kind="tokens", pad_id=0)))
    return ERROR
  if case == "wrong_shape":
    _check_error(_raises(lambda: dedup.content_hashes(np.zeros(()), kind="image")))
    return ERROR
  if case == "empty":
    assert dedup.content_hashes(_IMG[:0], kind="image").shape == (0,)
    return CORRECT
  raise NA("takes no ids or labels (rows are returned in order)")


@_dedup_subject("hash_batches")
def _hash_batches(case):
  batches = [{"id": _TIDS[:4], "x": _IMG[:4], "mask": np.array([True, True, True, False])},
             {"id": _TIDS[4:], "x": _IMG[4:]}]
  ids, h = dedup.hash_batches(batches, kind="image")
  np.testing.assert_array_equal(ids, np.r_[_TIDS[:3], _TIDS[4:]])
  if case == "permuted":
    rev = [{k: v[::-1] for k, v in b.items()} for b in batches[::-1]]
    i2, h2 = dedup.hash_batches(rev, kind="image")
    np.testing.assert_array_equal(h2[np.argsort(i2)], h[np.argsort(ids)])
    return CORRECT
  if case == "nan_on_padding":
    f = [dict(b, x=b["x"].astype(np.float32)) for b in batches]
    f[0]["x"][3] = np.nan
    i2, _ = dedup.hash_batches(f, kind="image")
    np.testing.assert_array_equal(i2, ids)
    return CORRECT
  if case == "id_out_of_range":
    big = [dict(b, id=b["id"] + 2**45) for b in batches]
    np.testing.assert_array_equal(dedup.hash_batches(big, kind="image")[0], ids + 2**45)
    return CORRECT
  if case == "wrong_dtype":
    _check_error(_raises(lambda: dedup.hash_batches(
        [dict(batches[1], id=batches[1]["id"] + 0.5)], kind="image")))
    return ERROR
  if case == "wrong_shape":
    _check_error(_raises(lambda: dedup.hash_batches(
        [dict(batches[1], id=batches[1]["id"][:-1])], kind="image")))
    return ERROR
  if case == "empty":
    _check_error(_raises(lambda: dedup.hash_batches([], kind="image")))
    return ERROR
  raise NA("hashes content: NaN is content (content_hashes), no labels")


@_dedup_subject("redundant_ids")
def _redundant(case):
  groups = [np.array([9, 3, 2**40]), np.array([-1, 5])]
  clean = dedup.redundant_ids(groups)
  if case == "permuted":
    np.testing.assert_array_equal(
        dedup.redundant_ids([g[::-1] for g in groups[::-1]]), clean)
    return CORRECT
  if case == "empty":
    assert len(dedup.redundant_ids([])) == 0
    return CORRECT
  if case == "wrong_dtype":
    _check_error(_raises(lambda: dedup.redundant_ids([np.array([1.5, 2.0])])))
    return ERROR
  raise NA("takes groups of ids only")


# ----------------------------------------------------------------------------------------------
# Post-training functions: calibration batches in, masks / scores / stats out.
# ----------------------------------------------------------------------------------------------


def _calib(b=B, seed=1):
  out = []
  for i in range(2):
    batch = make_batch(b, seed + i)
    out.append({k: batch[k] for k in ("x", "mask", "id")})
  return out


POSTTRAINING: dict[str, Callable[[list], Any]] = {
    "wanda": lambda bs: pt.wanda(apply_fn, PARAMS, bs, 0.5),
    "sparsegpt": lambda bs: pt.sparsegpt(apply_fn, PARAMS, bs, 0.5),
    "wanda_scores": lambda bs: pt.wanda_scores(apply_fn, PARAMS, bs),
    "sparsegpt_scores": lambda bs: pt.sparsegpt_scores(apply_fn, PARAMS, bs),
    "calibrate": lambda bs: pt.calibrate(apply_fn, PARAMS, bs).stats,
    "layer_errors": lambda bs: pt.layer_errors(
        apply_fn, PARAMS, masks.apply_mask(PARAMS, pt.wanda(apply_fn, PARAMS, _calib(), 0.5)), bs),
}


def _posttraining_case(name: str, case: str) -> str:
  call = POSTTRAINING[name]
  clean = call(_calib())
  if case == "permuted":
    _tree_close(call([_permute(b, np.random.default_rng(3).permutation(B)) for b in _calib()]),
                clean, rtol=1e-4, atol=1e-6)
    return CORRECT
  if case == "nan_inf":
    bs = _calib()
    bs[1] = _nan(bs[1])
    _check_error(_raises(lambda: call(bs)))
    return ERROR
  if case == "nan_on_padding":
    bs = _calib()
    bs[0] = _nan(bs[0], [0, B - 1])
    _tree_close(call(bs), clean)
    return CORRECT
  if case == "id_out_of_range":
    bs = _calib()
    bs[0]["id"] = bs[0]["id"] + 2**40  # ids of calibration rows are reported, never indexed
    _tree_close(call(bs), clean)
    return CORRECT
  if case == "wrong_dtype":
    bs = _calib()
    bs[0]["mask"] = bs[0]["mask"].astype(np.float32)
    _check_error(_raises(lambda: call(bs)))
    return ERROR
  if case == "wrong_shape":
    bs = _calib()
    _check_error(_raises(lambda: call([dict(b, x=b["x"][:, :-1]) for b in bs])))
    _check_error(_raises(lambda: call([bs[0], dict(bs[1], x=bs[1]["x"][:-2])])))
    return ERROR
  if case == "empty":
    _check_error(_raises(lambda: call([])))
    return ERROR
  raise NA("takes no labels")


# ----------------------------------------------------------------------------------------------
# The harness.
# ----------------------------------------------------------------------------------------------


def subjects() -> dict[str, Callable[[str], str]]:
  out = {}
  for name, spec in SCORES.items():
    if spec.kind == "batch":
      out[f"score:{name}"] = lambda case, n=name: _batch_score_case(n, case)
    elif spec.kind == "tracker":
      out[f"score:{name}"] = lambda case, n=name: _tracker_case(n, case)
    elif name in DATASET_SCORES:
      out[f"score:{name}"] = lambda case, n=name: _dataset_score_case(n, case)
  for name in masks.METHODS:
    out[f"mask:{name}"] = lambda case, n=name: _mask_case(n, case)
  for name in PRUNERS:
    out[f"online:{name}"] = lambda case, n=name: _pruner_case(n, case)
  for name, fn in DEDUP.items():
    out[f"dedup:{name}"] = fn
  for name in POSTTRAINING:
    out[f"posttraining:{name}"] = lambda case, n=name: _posttraining_case(n, case)
  return out


SUBJECTS = subjects()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("subject", sorted(SUBJECTS))
def test_edge(subject, case):
  try:
    outcome = SUBJECTS[subject](case)
  except NA as why:
    pytest.skip(f"n/a: {why}")
  assert outcome in (CORRECT, ERROR)


def _public_functions(module) -> set[str]:
  return {n for n, v in vars(module).items() if not n.startswith("_") and inspect.isfunction(v)
          and getattr(v, "__module__", "").startswith("prunejax")}


def test_every_public_function_is_in_the_harness():
  missing = [n for n, s in SCORES.items() if s.kind == "dataset" and n not in DATASET_SCORES]
  assert not missing, f"dataset scores without harness inputs: {missing}"
  # Helpers that compute parts of the above (hashing primitives, k-means steps, LSH sizing) are
  # covered through the functions that call them.
  helpers = {"normalize_text", "lsh_params", "minhash_signatures", "shingle_hashes",
             "normalize_rows", "cluster_centroids", "cluster_max_similarity", "semdedup_order",
             "spherical_kmeans"}
  missing = sorted(_public_functions(dedup) - set(DEDUP) - helpers)
  assert not missing, f"dedup functions without harness inputs: {missing}"
  pt_public = {"wanda", "sparsegpt", "wanda_scores", "sparsegpt_scores", "calibrate",
               "layer_errors"}
  exported = {n for n in dir(pt) if n in pt_public or n.startswith(("wanda", "sparsegpt"))}
  missing = sorted({n for n in exported if inspect.isfunction(getattr(pt, n))
                    and not n.endswith("_frame")} - set(POSTTRAINING))
  assert not missing, f"post-training functions without harness inputs: {missing}"


def table() -> str:
  """The function x case table: correct / clean error / n/a, or FAIL with the reason."""
  rows = ["| function | " + " | ".join(CASES) + " |", "|---|" + "---|" * len(CASES)]
  for name in sorted(SUBJECTS):
    cells = []
    for case in CASES:
      try:
        cells.append(SUBJECTS[name](case))
      except NA:
        cells.append("n/a")
      except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0]
        cells.append(f"FAIL ({type(e).__name__}: {first[:80]})")
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(table())
  sys.exit(0)
