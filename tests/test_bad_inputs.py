"""A property-based sweep of bad inputs to the public API (labels, ids, shapes, dtypes, masks,
files): every call either gives the correct result or raises a one-line prunejax error, never a
plausible wrong number (a silent wrong result)."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, example, given, settings, strategies as st

from prunejax import fileio, losses, optim
from prunejax.checkpoint import Units
from prunejax.errors import PrunejaxError
from prunejax.scores import align, load_scores, save_scores

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture])


def _check_error(e: BaseException) -> None:
  assert isinstance(e, PrunejaxError), f"{type(e).__name__}: {e}"
  assert str(e) and "\n" not in str(e)


# ----------------------------------------------------------------------------------------------
# Labels: the one cross-entropy.
# ----------------------------------------------------------------------------------------------


# One program per logits width and label dtype (op by op, each compiled some twenty single ops); a
# float label is refused when traced, from its dtype alone, as when called op by op.
_cross_entropy = jax.jit(losses.cross_entropy)


@settings(max_examples=60, **SETTINGS)
@given(c=st.sampled_from([1, 3, 5]), labels=st.lists(st.integers(-8, 12), min_size=8, max_size=8),
       dtype=st.sampled_from(["int32", "int8", "uint8", "float32", "bool"]),
       seed=st.integers(0, 1000))
def test_cross_entropy_labels(c, labels, dtype, seed):
  y = np.asarray(labels)
  if dtype == "uint8":
    y = np.abs(y)
  y = y.astype(dtype)
  z = np.random.default_rng(seed).normal(size=(len(y), c)).astype(np.float32)
  try:
    ce = np.asarray(_cross_entropy(z, y))
  except Exception as e:  # noqa: BLE001
    _check_error(e)
    assert not np.issubdtype(y.dtype, np.integer)  # only non-integer labels are refused
    return
  assert np.issubdtype(y.dtype, np.integer)
  z64 = z.astype(np.float64)
  for i, label in enumerate(y.astype(np.int64)):
    if 0 <= label < c:  # a float64 reference, example by example
      ref = np.log(np.sum(np.exp(z64[i] - z64[i].max()))) + z64[i].max() - z64[i, label]
      np.testing.assert_allclose(ce[i], ref, rtol=1e-5, atol=1e-6)
    else:
      assert np.isnan(ce[i]), (label, c, ce[i])  # never a plausible number


# ----------------------------------------------------------------------------------------------
# Ids and scores on disk.
# ----------------------------------------------------------------------------------------------

id_arrays = st.one_of(
    st.lists(st.integers(-3, 20), min_size=0, max_size=8).map(np.asarray),
    st.lists(st.one_of(st.floats(-3, 20), st.just(float("nan"))), min_size=1, max_size=5)
    .map(np.asarray),
    st.lists(st.booleans(), min_size=1, max_size=4).map(np.asarray),
    st.lists(st.lists(st.integers(0, 9), min_size=2, max_size=2), min_size=1, max_size=3)
    .map(np.asarray))


@settings(max_examples=80, **SETTINGS)
@given(ids=id_arrays, length=st.integers(0, 9), extra=st.booleans())
def test_scores_files_round_trip_or_refuse(ids, length, extra):
  scores = np.arange(length, dtype=np.float32) / 7
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "s.npz")
    try:
      save_scores(path, ids, el2n=scores, **({"extra": scores[:1]} if extra else {}))
    except Exception as e:  # noqa: BLE001
      _check_error(e)
      # Whatever save_scores refuses, load_scores refuses too when someone writes it anyway.
      np.savez(path, ids=ids, el2n=scores, **({"extra": scores[:1]} if extra else {}))
      try:
        load_scores(path)
      except Exception as e2:  # noqa: BLE001
        _check_error(e2)
        return
      raise AssertionError(f"load_scores accepted what save_scores refused: ids={ids!r}")
    got_ids, got = load_scores(path)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got["el2n"], scores)
    assert len(np.unique(ids)) == len(ids) == length and ids.ndim == 1


@settings(max_examples=60, **SETTINGS)
@given(cut=st.floats(0, 1), flip=st.integers(0, 10**6), bit=st.integers(0, 7),
       mode=st.sampled_from(["truncate", "flip", "append", "zero"]))
# Found by hypothesis: zeroed bytes in the zip's directory rename the ids member (no ".npy"), and
# numpy then returns its raw bytes instead of an array.
@example(cut=0.947265625, flip=6, bit=0, mode="zero")
def test_damaged_scores_files_are_refused_never_misread(cut, flip, bit, mode):
  ids = np.arange(100, 300, dtype=np.int64)
  scores = np.linspace(0, 1, 200, dtype=np.float32)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "s.npz")
    save_scores(path, ids, meta={"fingerprint": "f"}, el2n=scores)
    raw = bytearray(open(path, "rb").read())
    if mode == "truncate":
      raw = raw[: int(cut * len(raw))]
    elif mode == "flip":
      raw[flip % len(raw)] ^= 1 << bit
    elif mode == "append":
      raw += bytes([bit]) * (1 + flip % 50)
    else:
      start = int(cut * len(raw))
      raw[start:start + 1 + flip % 64] = bytes(len(raw[start:start + 1 + flip % 64]))
    open(path, "wb").write(bytes(raw))
    try:
      got_ids, got = load_scores(path, meta={"fingerprint": "f"})
    except Exception as e:  # noqa: BLE001
      _check_error(e)
      return
    np.testing.assert_array_equal(got_ids, ids)  # read back: then exactly what was written
    np.testing.assert_array_equal(got["el2n"], scores)


@settings(max_examples=60, **SETTINGS)
@given(cut=st.floats(0, 1), flip=st.integers(0, 10**6), bit=st.integers(0, 7),
       mode=st.sampled_from(["truncate", "flip", "edit"]))
def test_damaged_unit_records_are_recomputed_never_misread(cut, flip, bit, mode):
  result = {"strategy": "dense", "test_accuracy": 0.9721, "history": [{"loss": 1.25}]}
  with tempfile.TemporaryDirectory() as d:
    units = Units(d, "fp")
    units.run("dense_r0", lambda: result)
    path = os.path.join(d, "units", "dense_r0.json")
    raw = bytearray(open(path, "rb").read())
    if mode == "truncate":
      raw = raw[: int(cut * len(raw))]
    elif mode == "flip":
      raw[flip % len(raw)] ^= 1 << bit
    else:  # a digit changed: still valid JSON
      text = raw.decode().replace("0.9721", f"0.97{bit}1")
      raw = bytearray(text.encode())
    open(path, "wb").write(bytes(raw))
    got = Units(d, "fp").get("dense_r0")
    assert got is None or got == json.loads(json.dumps(result))


@settings(max_examples=40, **SETTINGS)
@given(n=st.integers(1, 10), missing=st.integers(0, 3), seed=st.integers(0, 100))
def test_align_finds_every_id_or_refuses(n, missing, seed):
  rng = np.random.default_rng(seed)
  score_ids = rng.permutation(50)[:n]
  values = rng.normal(size=n)
  ask = np.concatenate([rng.permutation(score_ids), 100 + np.arange(missing)])
  try:
    got = align(ask, score_ids, values)
  except Exception as e:  # noqa: BLE001
    _check_error(e)
    assert missing > 0
    return
  assert missing == 0
  lookup = dict(zip(score_ids.tolist(), values.tolist()))
  assert got.tolist() == [lookup[i] for i in ask.tolist()]


# ----------------------------------------------------------------------------------------------
# Masks: the masked optimizer.
# ----------------------------------------------------------------------------------------------


@jax.jit
def _masked_sgd_step(mask, params):
  """One step of the masked optimizer from its init, as one program per mask and params shapes
  (op by op, each shape compiled some ten single ops). Its checks are of structure, shape and
  dtype, so a bad mask is refused while tracing, as when called op by op."""
  tx = optim.masked(optax.sgd(0.1, momentum=0.9), mask)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates)


@settings(max_examples=40, **SETTINGS)
@given(m=st.integers(1, 3), n=st.integers(1, 3), kind=st.sampled_from(
    ["exact", "row", "scalar", "transposed", "missing_leaf", "extra_leaf", "float", "list"]),
    seed=st.integers(0, 100))
def test_masked_optimizer_masks_exactly_or_refuses(m, n, kind, seed):
  rng = np.random.default_rng(seed)
  # Cast on the host and put as is (jnp.asarray compiles a copy or a conversion per shape).
  params = {"w": jax.device_put(rng.normal(size=(m, n)).astype(np.float32)),
            "b": jax.device_put(rng.normal(size=(n,)).astype(np.float32))}
  exact = {"w": rng.random((m, n)) > 0.5, "b": np.ones(n, bool)}
  mask = {"exact": exact,
          "row": {"w": exact["w"][:1], "b": exact["b"]},
          "scalar": {"w": np.array(True), "b": exact["b"]},
          "transposed": {"w": exact["w"].T, "b": exact["b"]},
          "missing_leaf": {"w": exact["w"]},
          "extra_leaf": {**exact, "c": np.ones(2, bool)},
          "float": {"w": exact["w"].astype(np.float32), "b": exact["b"]},
          "list": [exact["w"], exact["b"]]}[kind]
  mask = jax.tree.map(jax.device_put, mask)
  try:
    new = _masked_sgd_step(mask, params)
  except Exception as e:  # noqa: BLE001
    _check_error(e)
    assert kind != "exact" and not (kind == "row" and m == 1) \
        and not (kind == "transposed" and m == n)
    return
  # Accepted only when the mask has exactly the params' structure and shapes (a (1, n) row or a
  # transposed square mask is a mask of that shape): pruned weights are then exactly zero.
  assert kind == "exact" or (kind == "row" and m == 1) or (kind == "transposed" and m == n)
  for k in params:
    keep = np.asarray(mask[k]).astype(bool)
    assert np.all(np.asarray(new[k])[~keep] == 0.0)
    want = np.asarray(params[k]) - np.float32(0.1)  # float32, as params[k] - 0.1 on the device
    np.testing.assert_allclose(np.asarray(new[k])[keep], want[keep], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# File metadata: another run's file is never used as this run's.
# ----------------------------------------------------------------------------------------------


@settings(max_examples=30, **SETTINGS)
@given(meta=st.dictionaries(st.sampled_from(["fingerprint", "seed", "dataset", "split"]),
                            st.one_of(st.integers(0, 3), st.sampled_from(["a", "b"])),
                            max_size=4),
       want=st.dictionaries(st.sampled_from(["fingerprint", "seed", "dataset", "split"]),
                            st.one_of(st.integers(0, 3), st.sampled_from(["a", "b"])),
                            max_size=4))
def test_npz_meta_must_match_what_the_reader_expects(meta, want):
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "f.npz")
    fileio.atomic_savez(path, meta=meta, x=np.arange(3))
    try:
      arrays, got = fileio.load_npz(path, meta=want)
    except Exception as e:  # noqa: BLE001
      _check_error(e)
      assert any(meta.get(k) != v for k, v in want.items())
      return
    assert all(meta.get(k) == v for k, v in want.items()) and got == meta
