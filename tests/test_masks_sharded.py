"""Masks, output scores and selection on 8 CPU devices equal one device's, in both mesh styles.

One subprocess per mesh style: a classic ``Mesh`` with ``NamedSharding`` (no mesh context), and
``jax.make_mesh`` + ``jax.set_mesh`` with explicit axis types. Each computes every mask on params
sharded over the 8 devices (masks bit for bit equal to one device's, every mask leaf sharded like
its parameter), EL2N / loss / margin / entropy on a batch sharded over the devices under ``jit``
and ``jax.shard_map`` (and ``pmap`` in the classic run), and the kept ids of ``select`` from the
sharded scores.

Values are coarse, so ties at the threshold must be broken across shards. The global magnitude mask
and the masked optimizer use the radix select (forced on these small trees; it is what runs on large
models); the other methods take the small-group path.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from conftest import run_on_devices

COMMON = textwrap.dedent("""
    import functools, hashlib
    import jax, jax.numpy as jnp, numpy as np, optax
    from prunejax import masks, optim, schedules, scores, select
    from prunejax.errors import ConfigError
    from prunejax.masks import core

    def radix(fn):
      def run(*args, **kwargs):
        saved, core._SORT_MAX = core._SORT_MAX, 0
        try:
          return fn(*args, **kwargs)
        finally:
          core._SORT_MAX = saved
      return run

    def make_params():
      rng = np.random.default_rng(0)
      shapes = {"conv": {"kernel": (3, 3, 8, 16), "bias": (16,)},
                "dense": {"kernel": (64, 24), "bias": (24,)},
                "emb": {"embedding": (50, 16)},
                "head": {"kernel": (24, 10), "bias": (10,)}}
      coarse = lambda s: (rng.integers(-20, 21, s) * 0.5).astype(np.float32)  # many ties.
      return jax.tree.map(lambda s: jnp.asarray(coarse(s)), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))

    def make_other_params():
      # Equinox / PyTorch layout (out, in) and an attention module of 2-D projections.
      rng = np.random.default_rng(1)
      coarse = lambda *s: jnp.asarray((rng.integers(-20, 21, s) * 0.5).astype(np.float32))
      attn = {c: {"kernel": coarse(16, 16), "bias": coarse(16)} for c in ("query", "key", "value")}
      attn["out"] = {"kernel": coarse(16, 16), "bias": coarse(16)}
      return {"attn": attn, "lin": {"weight": coarse(24, 16), "bias": coarse(24)}}

    def quadratic_steps(params, tx, steps):
      @jax.jit
      def step(p, s):
        g = jax.tree.map(lambda x: 0.1 * x, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
      state = tx.init(params)
      for _ in range(steps):
        params, state = step(params, state)
      return optim.get_mask(state), params

    def all_masks(params, other):
      tx = optim.masked(optax.sgd(0.1, momentum=0.9),
                        mask_fn=functools.partial(masks.magnitude, scope="global"),
                        schedule=schedules.one_shot(0.6, step=1))
      opt_mask, trained = radix(quadratic_steps)(params, tx, 3)
      mag = radix(masks.magnitude)(params, 0.7)
      return {
          "magnitude_global": mag,
          "magnitude_jit": jax.jit(lambda p, s: masks.magnitude(p, s))(params, 0.7),
          "masked_optimizer": opt_mask,
          "trained_zeros": jax.tree.map(lambda p: p != 0, trained),
          "applied_zeros": jax.tree.map(lambda p: p != 0, masks.apply_mask(params, mag)),
          "magnitude_erk": masks.magnitude(params, 0.35, scope="layerwise", distribution="erk"),
          "random": masks.random(params, 0.5, key=jax.random.key(0)),
          "neurons": masks.neurons(params, 0.5),
          "n_m": masks.n_m(params, 2, 4),
          "heads": masks.heads(other, 0.5, num_heads=4),
          "neurons_out_in": masks.neurons(other, 0.5, filter_fn=masks.make_filter_fn(
              include=["^lin/"])),
          "n_m_out_in": masks.n_m(other, 2, 4, filter_fn=masks.make_filter_fn(include=["^lin/"])),
      }, float(masks.sparsity_of(mag))

    def digest(mask_tree):
      return [hashlib.sha1(np.packbits(np.asarray(m).ravel()).tobytes()).hexdigest()[:16]
              + f":{int(np.sum(m))}" for m in jax.tree.leaves(mask_tree)]

    def make_model_and_batch():
      rng = np.random.default_rng(2)
      params = {"l0": {"kernel": jnp.asarray(rng.standard_normal((12, 16)), jnp.float32),
                       "bias": jnp.asarray(rng.standard_normal(16), jnp.float32)},
                "head": {"kernel": jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)}}
      apply_fn = lambda p, x: jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"]) @ \\
          p["head"]["kernel"]
      batch = {"x": jnp.asarray(rng.standard_normal((32, 12)), jnp.float32),
               "y": jnp.asarray(rng.integers(0, 5, 32), jnp.int32),
               "id": jnp.asarray(rng.permutation(1000)[:32], jnp.int32),
               "mask": jnp.asarray(np.arange(32) < 29)}
      return apply_fn, params, batch

    SCORES = ("el2n", "loss", "margin", "entropy")

    def all_scores(apply_fn, params, batch):
      out = {}
      for name in SCORES:
        fn = jax.jit(functools.partial(getattr(scores, name), apply_fn))
        out[name] = fn(params, batch)
        out[name + "_nomask"] = fn(params, {k: v for k, v in batch.items() if k != "mask"})
      return out

    def kept_ids(batch, el2n):
      return select.select(batch["id"], el2n, fraction=0.5, keep="hard").tolist()
""")

SCRIPT = COMMON + textwrap.dedent("""
    import contextlib, json
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    style = "@STYLE@"
    assert jax.device_count() == 8
    if style == "classic":
      mesh = Mesh(np.asarray(jax.devices()), ("data",))
      context = contextlib.nullcontext
      put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    else:
      mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
      context = functools.partial(jax.set_mesh, mesh)  # set_mesh(mesh) alone sets it globally.
      put = lambda x, spec: jax.device_put(x, spec)

    def spec(leaf):
      axes = [a for a in range(leaf.ndim) if leaf.shape[a] % 8 == 0]
      if not axes:
        return P()
      a = max(axes, key=lambda a: leaf.shape[a])
      return P(*[("data" if i == a else None) for i in range(leaf.ndim)])

    def spec_list(x):  # P('data', None) -> ["data"]; P(None) and P() -> [].
      axes = list(getattr(x.sharding, "spec", ["?"]))
      while axes and axes[-1] is None:
        axes.pop()
      return axes

    def specs_of(tree):
      return [spec_list(l) for l in jax.tree.leaves(tree)]

    params, other = make_params(), make_other_params()
    apply_fn, model_params, batch = make_model_and_batch()
    one, sparsity_one = all_masks(jax.device_put(params, jax.devices()[0]),
                                  jax.device_put(other, jax.devices()[0]))
    scores_one = all_scores(apply_fn, model_params, batch)
    out = {"one": {k: digest(v) for k, v in one.items()}, "sparsity_one": sparsity_one,
           "kept_one": kept_ids(batch, scores_one["el2n"])}
    with context():
      sharded = jax.tree.map(lambda l: put(l, spec(l)), params)
      sharded_other = jax.tree.map(lambda l: put(l, spec(l)), other)
      out["n_sharded"] = sum(l.sharding.spec != P() for l in jax.tree.leaves(sharded))
      many, out["sparsity_many"] = all_masks(sharded, sharded_other)
      out["many"] = {k: digest(v) for k, v in many.items()}
      out["mask_specs"] = {k: specs_of(v) for k, v in many.items()}
      out["param_specs"] = specs_of(sharded)
      out["other_specs"] = specs_of(sharded_other)
      replicated = jax.tree.map(lambda l: put(l, P()), model_params)
      sharded_batch = jax.tree.map(lambda l: put(l, P("data")), batch)
      scores_many = all_scores(apply_fn, replicated, sharded_batch)
      out["score_err"] = {k: float(np.max(np.abs(np.asarray(v) - np.asarray(scores_one[k]))))
                          for k, v in scores_many.items()}
      out["score_specs"] = {k: spec_list(v) for k, v in scores_many.items()}
      out["kept_many"] = kept_ids(sharded_batch, scores_many["el2n"])
      # shard_map: scores on each device's rows; a mask of replicated params; sharded params fail.
      for name in SCORES:
        fn = jax.shard_map(functools.partial(getattr(scores, name), apply_fn), mesh=mesh,
                           in_specs=(P(), P("data")), out_specs=P("data"))
        got = jax.jit(fn)(replicated, sharded_batch)
        out["score_err"]["shard_map_" + name] = float(
            np.max(np.abs(np.asarray(got) - np.asarray(scores_one[name]))))
      replicated_params = jax.tree.map(lambda l: put(l, P()), params)
      in_map = jax.jit(jax.shard_map(lambda p: masks.magnitude(p, 0.7), mesh=mesh, in_specs=P(),
                                     out_specs=P()))(replicated_params)
      out["shard_map_mask"] = digest(in_map)
      try:
        jax.jit(jax.shard_map(lambda p: masks.magnitude(p, 0.7), mesh=mesh,
                              in_specs=P("data"), out_specs=P("data")))(
            {"w": {"kernel": put(params["dense"]["kernel"], P("data"))}})
        out["shard_map_error"] = None
      except ConfigError as e:
        out["shard_map_error"] = str(e)
    if style == "classic":  # pmap: each device its rows (scores) or a replica (masks).
      rows = jax.tree.map(lambda l: l.reshape((8, -1) + l.shape[1:]), batch)
      stacked = jax.tree.map(lambda l: jnp.stack([l] * 8), model_params)
      for name in SCORES:
        got = jax.pmap(functools.partial(getattr(scores, name), apply_fn))(stacked, rows)
        out["score_err"]["pmap_" + name] = float(
            np.max(np.abs(np.asarray(got).reshape(-1) - np.asarray(scores_one[name]))))
      per_device = jax.pmap(lambda p: masks.magnitude(p, 0.7))(
          jax.tree.map(lambda l: jnp.stack([l] * 8), params))
      out["pmap_masks"] = [digest(jax.tree.map(lambda m: m[d], per_device)) for d in (0, 7)]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module", params=["classic", "explicit"])
def sharded_run(request):
  return request.param, run_on_devices(SCRIPT.replace("@STYLE@", request.param), 8)


def test_masks_equal_on_1_and_8_devices(sharded_run):
  style, out = sharded_run
  assert out["n_sharded"] == 6  # every leaf but the head bias is split over the 8 devices.
  assert out["many"] == out["one"]
  assert out["sparsity_many"] == out["sparsity_one"]
  assert out["shard_map_mask"] == out["one"]["magnitude_global"]
  if style == "classic":
    assert out["pmap_masks"] == [out["one"]["magnitude_global"]] * 2
  namespace = {}
  exec(COMMON, namespace)  # this process has one device.
  here = namespace["radix"](namespace["masks"].magnitude)(namespace["make_params"](), 0.7)
  assert namespace["digest"](here) == out["many"]["magnitude_global"]


def test_mask_leaves_are_sharded_like_their_params(sharded_run):
  style, out = sharded_run
  # With explicit axes every mask leaf has its parameter's sharding (with a classic Mesh the
  # compiler chooses; there only the values are checked).
  for name, mask_specs in out["mask_specs"].items():
    like = out["other_specs"] if name in ("heads", "neurons_out_in", "n_m_out_in") else \
        out["param_specs"]
    assert mask_specs == like or style == "classic", name
  assert any(spec for spec in out["param_specs"]) and any(spec for spec in out["other_specs"])


def test_scores_and_selection_equal_on_1_and_8_devices(sharded_run):
  style, out = sharded_run
  expected = {"el2n", "loss", "margin", "entropy"}
  assert {k for k in out["score_err"] if "_" not in k} == expected
  assert all(err < 1e-5 for err in out["score_err"].values()), out["score_err"]
  assert len(out["score_err"]) == (12 if style == "explicit" else 16)  # jit, shard_map (, pmap).
  if style == "explicit":
    assert all(spec == ["data"] for spec in out["score_specs"].values())
  assert out["kept_many"] == out["kept_one"] and len(out["kept_one"]) == 16


def test_a_mask_of_per_shard_params_inside_shard_map_is_an_error(sharded_run):
  _, out = sharded_run
  assert out["shard_map_error"] is not None
  assert "vary over mesh axes ['data']" in out["shard_map_error"]
  assert "outside shard_map" in out["shard_map_error"] and "\n" not in out["shard_map_error"]


def test_one_check_of_every_leaf_names_the_first_bad_one():
  """``masks.core.first_nonfinite`` (the params checks of the mask methods and post-training)
  checks every leaf in one program: the first leaf with NaN or inf by index, None for none or no
  leaves, numpy and jax leaves together, any order, in agreement with a per-leaf numpy loop."""
  import jax.numpy as jnp
  from prunejax.masks import core
  rng = np.random.default_rng(0)
  leaves = [rng.normal(size=s).astype(np.float32) for s in ((3,), (2, 4), (5,), (1,))]
  assert core.first_nonfinite(leaves) is None and core.first_nonfinite([]) is None
  for bad, value in ((1, np.nan), (3, np.inf), (0, -np.inf)):
    host = [l.copy() for l in leaves]
    host[bad].reshape(-1)[-1] = value
    got = [jnp.asarray(l) if i % 2 else l for i, l in enumerate(host)]  # odd leaves on the device
    want = next(i for i, l in enumerate(got) if not np.all(np.isfinite(np.asarray(l))))
    assert core.first_nonfinite(got) == want == bad
    assert core.first_nonfinite(got[::-1]) == len(got) - 1 - bad
  two = [l.copy() for l in leaves]  # two bad leaves: the first is named, in either order
  two[1][0], two[3][0] = np.nan, np.inf
  assert core.first_nonfinite(two) == 1 and core.first_nonfinite(two[::-1]) == 0


def test_leaves_committed_to_different_devices_are_checked_one_by_one():
  """Leaves on different devices cannot enter one program: the checks fall back to one leaf at a
  time and give the same answers (the NaN leaf named, a mask's unselected leaf that prunes an
  entry refused, sparsity counted over every device's leaves)."""
  out = run_on_devices("""
      import json
      import jax, jax.numpy as jnp, numpy as np
      from prunejax.errors import ConfigError
      from prunejax.masks import core
      d0, d1 = jax.devices()[:2]
      leaves = [jax.device_put(np.ones(3, np.float32), d0),
                jax.device_put(np.array([1.0, np.nan], np.float32), d1)]
      put = lambda a, d: jax.device_put(np.array(a), d)
      mask = {"a": {"kernel": put([[True, False]], d0), "bias": put([True, True], d1)},
              "b": {"kernel": put([[True, True, True]], d1), "bias": put([True, False], d0)}}
      try:
        core.sparsity_of(mask)
        refused = ""
      except ConfigError as e:
        refused = str(e)
      mask["b"]["bias"] = put([True, True], d0)
      print(json.dumps({"bad": core.first_nonfinite(leaves), "refused": refused,
                        "sparsity": float(core.sparsity_of(mask))}))
      """, 2)
  assert out["bad"] == 1 and out["sparsity"] == float(np.float32(1) / np.float32(5))
  assert "the mask prunes entries of b/bias" in out["refused"]
