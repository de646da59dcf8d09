"""Random pytrees, shapes, dtypes and fractions thrown at the mask and selection functions: each
call either returns a correct result or raises a one-line prunejax error, never an error from deep
inside JAX or NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from prunejax import masks, select
from prunejax.errors import PrunejaxError

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16, jnp.int32, jnp.bool_]
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
fractions = st.one_of(st.floats(-0.5, 1.5), st.just(float("nan")), st.sampled_from([0.0, 1.0]))


@st.composite
def pytrees(draw):
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  n = draw(st.integers(0, 4))
  tree = {}
  for i in range(n):
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    # Cast on the host (the same float32 rounding, then the same cast) and put on the device as
    # is: jnp.asarray and .astype compiled a copy and a conversion for each new shape and dtype.
    leaf = jax.device_put(rng.normal(size=shape).astype(np.float32).astype(dtype))
    name = draw(st.sampled_from(["kernel", "bias", "embedding", "scale"]))
    tree[f"layer{i}"] = {name: leaf} if draw(st.booleans()) else [leaf]
  return tree


def _prunable_count(tree):
  leaves, flags, _ = masks.core.prunable_leaves(tree, None)
  return sum(math.prod(l.shape) for l, f in zip(leaves, flags) if f)


def _check_error(e: Exception):
  assert isinstance(e, PrunejaxError), f"{type(e).__name__}: {e}"
  assert "\n" not in str(e) and str(e)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=pytrees(), sparsity=fractions, scope=st.sampled_from(["global", "layerwise", "bad"]))
def test_magnitude_on_random_pytrees(tree, sparsity, scope):
  try:
    mask = masks.magnitude(tree, sparsity, scope=scope)
  except Exception as e:  # noqa: BLE001
    _check_error(e)
    return
  assert jax.tree.structure(mask) == jax.tree.structure(tree)
  for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(tree)):
    assert m.shape == p.shape and m.dtype == jnp.bool_
  n = _prunable_count(tree)
  pruned = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(mask))
  if scope == "global":
    assert pruned == int(np.floor(sparsity * n + 0.5)) or pruned == round(sparsity * n)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=pytrees(), sparsity=fractions, seed=st.integers(0, 100))
def test_random_and_erk_on_random_pytrees(tree, sparsity, seed):
  for fn in (lambda: masks.random(tree, sparsity, key=jax.random.key(seed)),
             lambda: masks.magnitude(tree, sparsity, scope="layerwise", distribution="erk")):
    try:
      mask = fn()
    except Exception as e:  # noqa: BLE001
      _check_error(e)
      continue
    assert jax.tree.structure(mask) == jax.tree.structure(tree)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 30), fraction=fractions,
       keep=st.sampled_from(["hard", "easy", "random", "x"]), balanced=st.booleans(),
       offset=st.floats(-0.2, 0.8), dup=st.booleans(), nan=st.booleans(),
       bad_len=st.booleans(), seed=st.integers(0, 10))
def test_select_on_random_inputs(n, fraction, keep, balanced, offset, dup, nan, bad_len, seed):
  rng = np.random.default_rng(seed)
  ids = rng.permutation(1000)[:n]
  if dup and n > 1:
    ids[0] = ids[1]
  scores = rng.normal(size=n + (1 if bad_len else 0)).astype(np.float32)
  if nan and n:
    scores[0] = np.nan
  labels = rng.integers(0, 3, n)
  try:
    kept = select.select(ids, scores, fraction=fraction, keep=keep, labels=labels,
                         class_balanced=balanced, offset=offset, seed=seed)
  except Exception as e:  # noqa: BLE001
    _check_error(e)
    return
  assert len(kept) == int(np.floor(fraction * n + 0.5))
  assert set(kept.tolist()) <= set(ids.tolist()) and len(set(kept.tolist())) == len(kept)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 30), fraction=fractions, beta=st.floats(-0.2, 1.2),
       strata=st.integers(-1, 10), seed=st.integers(0, 10))
def test_ccs_on_random_inputs(n, fraction, beta, strata, seed):
  rng = np.random.default_rng(seed)
  ids = np.arange(n)
  scores = rng.normal(size=n)
  try:
    kept = select.ccs(ids, scores, fraction=fraction, beta=beta, num_strata=strata, seed=seed)
  except Exception as e:  # noqa: BLE001
    _check_error(e)
    return
  assert len(kept) == int(np.floor(fraction * n + 0.5))
