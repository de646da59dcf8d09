"""Scores over training and over the whole dataset: the (init, update) trackers
(prunejax.scores.dynamics), prototypes (.prototypes) and Confident Learning (.label_quality)."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import scores
from prunejax.errors import ConfigError, DataError
from prunejax.scores import label_quality as lq


# Inputs are cast on the host and put on the device as they are, and trackers are updated and read
# through jax.jit: jnp.asarray compiled a copy or a conversion per shape, and an update called
# outside jit compiled each of its twenty-odd ops alone.


def _batch(ids, y, mask=None):
  ids = np.asarray(ids)
  mask = np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool)
  return {"id": jax.device_put(ids), "y": jax.device_put(np.asarray(y, np.int32)),
          "mask": jax.device_put(mask)}


def _logits_for(correct, y, num_classes=3):
  """Logits whose argmax is ``y`` where ``correct`` and ``(y + 1) % C`` elsewhere."""
  y = np.asarray(y)
  pred = np.where(correct, y, (y + 1) % num_classes)
  return jax.device_put((np.eye(num_classes)[pred] * 2.0).astype(np.float32))


def _read(state, *methods):
  """``state.<method>()`` for each of ``methods``, as one program, on the host."""
  return [np.asarray(v) for v in jax.jit(lambda s: [getattr(s, m)() for m in methods])(state)]


# ----------------------------------------------------------------------------------------------
# Forgetting.
# ----------------------------------------------------------------------------------------------


def test_forgetting_hand_computed():
  tracker = scores.forgetting()
  ids = np.array([10, 20, 30, 40])
  state = tracker.init(ids[::-1])  # any order in, sorted state.
  np.testing.assert_array_equal(state.ids, ids)
  update = jax.jit(tracker.update)
  y = [0, 1, 2, 0]
  # Presentations of ids 10, 20, 30, 40 (C: correct, I: incorrect):
  #   10: C I C I  -> 2 forgets     20: C C C C -> 0 (unforgettable)
  #   30: I I I I  -> never learned  40: I C I C -> 1 forget
  seq = [[1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 1, 0, 1]]
  for step in seq:
    # A padding row (id -1, mask False) and an unknown id ride along and change nothing.
    batch = _batch([40, 30, 20, 10, -1, 99], y[::-1] + [0, 0],
                   [True, True, True, True, False, True])
    correct = np.array(step[::-1] + [1, 1], bool)
    state = update(state, batch, _logits_for(correct, batch["y"]))
  np.testing.assert_array_equal(state.forgets, [2, 0, 0, 1])
  np.testing.assert_array_equal(state.presented, [4, 4, 4, 4])
  np.testing.assert_array_equal(state.learned, [True, True, False, True])
  # Never learned: max presentations + 1 = 5, above anything a learned example can reach.
  np.testing.assert_array_equal(_read(state, "scores")[0], [2.0, 0.0, 5.0, 1.0])


def test_forgetting_partial_batches_and_repeated_ids():
  tracker = scores.forgetting()
  state = tracker.init(np.arange(3))
  update = jax.jit(tracker.update)
  state = update(state, _batch([0], [0]), _logits_for([True], [0]))
  state = update(state, _batch([1], [0]), _logits_for([True], [0]))
  state = update(state, _batch([0], [0]), _logits_for([False], [0]))
  np.testing.assert_array_equal(state.forgets, [1, 0, 0])
  np.testing.assert_array_equal(_read(state, "scores")[0], [1.0, 0.0, 3.0])  # id 2: 2 + 1.
  with pytest.raises(ConfigError, match="unique"):
    tracker.init(np.array([1, 1, 2]))


# ----------------------------------------------------------------------------------------------
# Cartography, AUM, running means.
# ----------------------------------------------------------------------------------------------


def test_cartography_matches_numpy():
  rng = np.random.default_rng(0)
  n, epochs, c = 6, 5, 4
  ids = np.arange(100, 100 + n)
  y = rng.integers(0, c, n)
  logits = rng.normal(size=(epochs, n, c)).astype(np.float32) * 2
  tracker = scores.cartography()
  state = tracker.init(ids)
  update = jax.jit(tracker.update)
  for e in range(epochs):
    perm = rng.permutation(n)  # a different batch order every epoch.
    state = update(state, _batch(ids[perm], y[perm]), logits[e, perm])
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  p_y = probs[:, np.arange(n), y]  # [epochs, n]
  confidence, variability, correctness = _read(state, "confidence", "variability", "correctness")
  np.testing.assert_allclose(confidence, p_y.mean(0), rtol=1e-5)
  np.testing.assert_allclose(variability, p_y.std(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(correctness, (logits.argmax(-1) == y[None]).mean(0), rtol=1e-6)


def test_aum_hand_computed():
  tracker = scores.aum()
  state = tracker.init(np.array([1, 2]))
  update = jax.jit(tracker.update)
  # Margins of id 1: (3 - 1) = 2 then (0 - 2) = -2; id 2 (label 1): (1 - 0) = 1 then (4 - 0) = 4.
  state = update(state, _batch([1, 2], [0, 1]),
                 np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 0.0]], np.float32))
  state = update(state, _batch([2, 1], [1, 0]),
                 np.array([[0.0, 4.0, 0.0], [0.0, 2.0, 1.0]], np.float32))
  np.testing.assert_allclose(_read(state, "mean")[0], [0.0, 2.5])


def test_running_mean_and_average_over_checkpoints():
  tracker = scores.running_mean()
  state = tracker.init(np.array([5, 6, 7]))
  update = jax.jit(tracker.update)
  state = update(state, _batch([5, 6, 7, -1], [0] * 4, [True, True, True, False]),
                 np.array([1.0, 2.0, 3.0, 100.0], np.float32))
  state = update(state, _batch([7, 5], [0, 0]), np.array([5.0, 3.0], np.float32))
  np.testing.assert_allclose(_read(state, "mean")[0], [2.0, 2.0, 4.0])

  def apply_fn(params, x):
    return x @ params["w"]

  rng = np.random.default_rng(0)
  ws = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(3)]
  batch = {"x": rng.normal(size=(5, 4)).astype(np.float32), "y": np.arange(5, dtype=np.int32) % 3,
           "mask": np.array([True, True, True, True, False])}
  stacked = {"w": np.stack(ws)}
  avg = np.asarray(jax.jit(functools.partial(scores.average_over_checkpoints, scores.el2n,
                                             apply_fn))(stacked, batch))
  el2n = jax.jit(functools.partial(scores.el2n, apply_fn))  # one program for the 3 checkpoints
  expected = np.mean([np.asarray(el2n({"w": w}, batch)) for w in ws], axis=0)
  np.testing.assert_allclose(avg, expected, rtol=1e-6)
  assert avg[4] == 0.0


# ----------------------------------------------------------------------------------------------
# Prototypes.
# ----------------------------------------------------------------------------------------------


def test_kmeans_two_blobs_and_determinism():
  x = jnp.array([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0], [10.0, 1.0]])
  c, assign = map(np.asarray, scores.kmeans(jax.random.key(0), x, 2, num_iters=10))
  c = c[np.argsort(c[:, 0])]
  np.testing.assert_allclose(c, [[0.0, 1.0], [10.0, 1.0]], atol=1e-6)
  assert assign[0] == assign[1] and assign[2] == assign[3] == assign[4] != assign[0]
  d = scores.prototypes(x, num_clusters=2, key=jax.random.key(3))
  np.testing.assert_allclose(d, [1.0, 1.0, 1.0, 1.0, 0.0], atol=1e-5)
  np.testing.assert_array_equal(d, scores.prototypes(x, num_clusters=2, key=jax.random.key(3)))


def test_prototypes_per_class_uses_own_class_centroids():
  # Class 0 sits at the origin, class 1 around (5, 5); one class-1 point lies at the origin.
  x = jnp.array([[0.0, 0.0], [0.0, 0.2], [5.0, 5.0], [5.0, 5.2], [0.0, 0.0]])
  labels = np.array([0, 0, 1, 1, 1])
  d = scores.prototypes(x, labels, num_clusters=1, key=jax.random.key(0), per_class=True)
  own_center = np.array([10.0 / 3, 10.2 / 3])
  x_np = np.asarray(x)  # rows read on the host (x[2] on the device compiles a slice)
  np.testing.assert_allclose(d, [0.1, 0.1, np.linalg.norm(x_np[2] - own_center),
                                 np.linalg.norm(x_np[3] - own_center),
                                 np.linalg.norm(own_center)], rtol=1e-5)
  with pytest.raises(ConfigError, match="needs labels_N"):
    scores.prototypes(x, num_clusters=1, key=jax.random.key(0), per_class=True)


# ----------------------------------------------------------------------------------------------
# Confident Learning, checked against cleanlab on the same probabilities.
# ----------------------------------------------------------------------------------------------


def _noisy_probs(seed):
  rng = np.random.default_rng(seed)
  n, c = int(rng.integers(30, 200)), int(rng.integers(2, 6))
  true = rng.integers(0, c, n)
  logits = rng.normal(size=(n, c)) + 2.5 * np.eye(c)[true] * rng.uniform(0.3, 1.5)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  labels = np.where(rng.random(n) < 0.2, rng.integers(0, c, n), true)
  labels[:c] = np.arange(c)  # every class present.
  return probs, labels


@pytest.mark.parametrize("seed", range(6))
def test_label_quality_matches_cleanlab(seed):
  count = pytest.importorskip("cleanlab.count")
  cl_filter = pytest.importorskip("cleanlab.filter")
  rank = pytest.importorskip("cleanlab.rank")
  probs, labels = _noisy_probs(seed)
  np.testing.assert_allclose(scores.self_confidence(probs, labels),
                             rank.get_self_confidence_for_each_label(labels, probs))
  np.testing.assert_allclose(scores.normalized_margin(probs, labels),
                             rank.get_normalized_margin_for_each_label(labels, probs))
  for calibrate in (False, True):
    np.testing.assert_array_equal(
        scores.confident_joint(probs, labels, calibrate=calibrate),
        count.compute_confident_joint(labels, probs, calibrate=calibrate))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for filter_by in lq.FILTERS:
      np.testing.assert_array_equal(
          scores.find_label_issues(probs, labels, filter_by=filter_by),
          cl_filter.find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1))


def test_confident_joint_hand_computed():
  # Thresholds: t0 = mean p0 over label-0 rows = 0.7, t1 = mean p1 over label-1 rows = 1.4 / 3.
  probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4], [0.8, 0.2]])
  labels = np.array([0, 0, 1, 1, 1])
  # Confident guesses by row: 0, 1 (0.5 >= t1 only), 1, none (0.6 < t0, 0.4 < t1), 0.
  np.testing.assert_array_equal(scores.confident_joint(probs, labels, calibrate=False),
                                [[1, 1], [1, 1]])
  # Off-diagonal: rows 1 and 4; row 1 is dropped because its label ties the model's prediction.
  np.testing.assert_array_equal(
      scores.find_label_issues(probs, labels, filter_by="confident_learning"),
      [False, False, False, False, True])


def test_out_of_fold_probs_never_predicts_on_training_ids():
  ids = np.arange(100, 130)
  labels = np.arange(30) % 3
  seen = []

  def fit_predict(train_ids, held_ids):
    assert not set(train_ids) & set(held_ids)
    assert len(train_ids) + len(held_ids) == 30
    seen.extend(held_ids.tolist())
    return np.tile(np.array([[0.2, 0.3, 0.5]]), (len(held_ids), 1)) + held_ids[:, None] * 0

  probs = scores.out_of_fold_probs(fit_predict, ids, labels, num_folds=3, seed=1)
  assert sorted(seen) == ids.tolist() and probs.shape == (30, 3)
  folds = scores.stratified_folds(labels, 3, seed=1)
  for k in range(3):  # stratified: a third of every class (10 each) within one, 10 per fold.
    per_class = np.bincount(labels[folds == k], minlength=3)
    assert set(per_class) <= {3, 4} and per_class.sum() == 10
  with pytest.raises(ConfigError, match="num_folds=1"):
    scores.stratified_folds(labels, 1)
  with pytest.raises(DataError, match="shape"):
    scores.out_of_fold_probs(lambda tr, he: np.zeros((1, 3)), ids, labels, num_folds=3)


def test_cross_validated_label_issues_find_flipped_labels():
  """End to end: K-fold logistic regression in JAX on separable blobs with flipped labels."""
  rng = np.random.default_rng(0)
  n, c = 150, 3
  centers = np.array([[4.0, 0.0], [-2.0, 3.5], [-2.0, -3.5]])
  true = np.arange(n) % c
  x = (centers[true] + rng.normal(size=(n, 2))).astype(np.float32)
  flipped = rng.choice(n, 12, replace=False)
  labels = true.copy()
  labels[flipped] = (true[flipped] + 1) % c
  ids = np.arange(n) + 1000

  @jax.jit
  def fit(x_tr, y_tr):
    def loss(w):
      logits = x_tr @ w["a"] + w["b"]
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y_tr[:, None], 1))
    w = {"a": jnp.zeros((2, c)), "b": jnp.zeros(c)}
    return jax.lax.fori_loop(0, 200, lambda _, w: jax.tree.map(
        lambda p, g: p - 0.5 * g, w, jax.grad(loss)(w)), w)

  predict = jax.jit(lambda x_he, w: jax.nn.softmax(x_he @ w["a"] + w["b"]))

  def fit_predict(train_ids, held_ids):
    tr, he = train_ids - 1000, held_ids - 1000
    w = fit(x[tr], labels[tr].astype(np.int32))
    return np.asarray(predict(x[he], w))

  probs = scores.out_of_fold_probs(fit_predict, ids, labels, num_folds=5)
  issues = scores.find_label_issues(probs, labels)
  found = set(np.flatnonzero(issues))
  assert len(found & set(flipped)) >= 10 and len(found - set(flipped)) <= 3
  # The label-quality scores rank the flipped examples lowest.
  worst = np.argsort(scores.self_confidence(probs, labels))[:12]
  assert len(set(worst) & set(flipped)) >= 10
