"""Masks on params sharded over 8 forced CPU devices equal the masks of one device, bit for bit.

Values are coarse, so ties at the threshold must be broken across shards. The global magnitude mask
and the masked optimizer use the radix select (forced on these small trees; it is what runs on large
models); the other methods take the small-group path.
"""

from __future__ import annotations

import textwrap

from conftest import run_on_devices

COMMON = textwrap.dedent("""
    import functools, hashlib
    import jax, jax.numpy as jnp, numpy as np, optax
    from prunejax import masks, optim, schedules
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

    def quadratic_steps(params, tx, steps):
      @jax.jit
      def step(p, s):
        g = jax.tree.map(lambda x: 0.1 * x, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
      state = tx.init(params)
      for _ in range(steps):
        params, state = step(params, state)
      return optim.get_mask(state)

    def all_masks(params):
      tx = optim.masked(optax.sgd(0.1, momentum=0.9),
                        mask_fn=functools.partial(masks.magnitude, scope="global"),
                        schedule=schedules.one_shot(0.6, step=1))
      return {
          "magnitude_global": radix(masks.magnitude)(params, 0.7),
          "masked_optimizer": radix(quadratic_steps)(params, tx, 3),
          "magnitude_erk": masks.magnitude(params, 0.35, scope="layerwise", distribution="erk"),
          "random": masks.random(params, 0.5, key=jax.random.key(0)),
          "neurons": masks.neurons(params, 0.5),
          "n_m": masks.n_m(params, 2, 4),
      }

    def digest(mask_tree):
      return [hashlib.sha1(np.packbits(np.asarray(m).ravel()).tobytes()).hexdigest()[:16]
              + f":{int(np.sum(m))}" for m in jax.tree.leaves(mask_tree)]
""")

SHARDED = COMMON + textwrap.dedent("""
    import json
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8
    mesh = Mesh(np.asarray(jax.devices()), ("data",))

    def spec(leaf):
      axes = [a for a in range(leaf.ndim) if leaf.shape[a] % 8 == 0]
      if not axes:
        return P()
      a = max(axes, key=lambda a: leaf.shape[a])
      return P(*[("data" if i == a else None) for i in range(leaf.ndim)])

    params = make_params()
    sharded = jax.tree.map(lambda l: jax.device_put(l, NamedSharding(mesh, spec(l))), params)
    n_sharded = sum(len(l.sharding.device_set) == 8 and l.sharding.spec != P()
                    for l in jax.tree.leaves(sharded))
    single = jax.device_put(params, jax.devices()[0])
    one, many = all_masks(single), all_masks(sharded)
    out = {"n_sharded": n_sharded, "one": {k: digest(v) for k, v in one.items()},
           "many": {k: digest(v) for k, v in many.items()}}
    print(json.dumps(out))
""")


def test_masks_equal_on_1_and_8_devices():
  out = run_on_devices(SHARDED, 8)
  assert out["n_sharded"] == 6  # every leaf but the head bias is split over the 8 devices.
  assert out["many"] == out["one"]
  namespace = {}
  exec(COMMON, namespace)  # this process has one device.
  here = namespace["radix"](namespace["masks"].magnitude)(namespace["make_params"](), 0.7)
  assert namespace["digest"](here) == out["many"]["magnitude_global"]
