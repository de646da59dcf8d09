"""Finding and tapping layers (prunejax.layer_taps) and their per-example rows
(prunejax.layer_rows)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import layer_rows, layer_taps, scores
from prunejax.errors import ConfigError
from prunejax.models import build_model, init_variables, make_apply_fn

B = 3


def _conv_case(dims, x_shape, w_shape, **kw):
  def apply_fn(params, x):
    return jax.lax.conv_general_dilated(x, params["w"], dimension_numbers=dims, **kw)
  rng = np.random.default_rng(0)
  # device_put: jnp.asarray would compile a copy per shape.
  return apply_fn, {"w": jax.device_put(rng.normal(size=w_shape).astype(np.float32))}, (
      jax.device_put(rng.normal(size=x_shape).astype(np.float32)))


CONVS = {
    "nhwc grouped strided dilated": (("NHWC", "HWIO", "NHWC"), (B, 7, 6, 4), (3, 2, 2, 6),
                                     dict(window_strides=(2, 1), padding=[(1, 2), (0, 1)],
                                          rhs_dilation=(1, 2), feature_group_count=2)),
    "nchw transposed cropped": (("NCHW", "OIHW", "NCHW"), (B, 2, 3, 3), (4, 2, 5, 5),
                                dict(window_strides=(1, 1), padding=[(3, -1), (4, 4)],
                                     lhs_dilation=(2, 1))),
    "nwc 1-d": (("NWC", "WIO", "NWC"), (B, 7, 3), (3, 3, 4),
                dict(window_strides=(2,), padding="SAME")),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_rows_reproduce_the_conv(name):
  """``layer_rows`` are im2col patches: (rows of group g) @ (kernel of group g) is the conv."""
  dims, x_shape, w_shape, kw = CONVS[name]
  apply_fn, params, x = _conv_case(dims, x_shape, w_shape, **kw)
  plan = layer_taps.find_layers(apply_fn, params, x)
  (layer,) = plan.layers.values()
  assert layer.kind == "conv" and plan.uses == {0: [("layer", layer.index)]}
  geo = layer_rows.conv_geometry(layer)
  # The rows and the conv in one compiled program (op by op, ~40 single ops compiled); the
  # products of rows and kernel on the host, in float64.
  rows_BxNxK, out = map(np.asarray, jax.jit(lambda p, x: (layer_rows.layer_rows(layer, x),
                                                          apply_fn(p, x)))(params, x))
  _, rhs_spec, out_spec = layer.eqn.params["dimension_numbers"]
  w = np.transpose(np.asarray(params["w"], np.float64),
                   tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))
  g, eg = geo.groups, geo.c_out // geo.groups
  w_GxKxE = np.moveaxis(w.reshape(-1, w.shape[-2], g, eg), 2, 0).reshape(g, -1, eg)
  got = np.einsum("bgnk,gke->bgne", rows_BxNxK.reshape(B, g, -1, w_GxKxE.shape[1]), w_GxKxE)
  out = np.transpose(out, (out_spec[0], out_spec[1]) + tuple(out_spec[2:]))
  want = np.swapaxes(out.reshape(B, g, eg, -1), 2, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _mlp_case():
  model = build_model("mlp", 3, hidden=(8,))
  x = np.random.default_rng(1).normal(size=(B, 4, 4, 1)).astype(np.float32)
  variables = init_variables(model, jax.random.key(0), x[:1])
  return model, make_apply_fn(model), variables, jax.device_put(x)


def test_forward_tap_records_calibration_statistics():
  """The module doc's calibration tap: per-layer sums of a^T a over the batch, one forward pass
  whose output is the model's."""
  model, apply_fn, variables, x = _mlp_case()
  plan = layer_taps.find_layers(apply_fn, variables, x)
  assert [layer.kind for layer in plan.layers.values()] == ["dense", "dense"]

  def tap(layer, act, out):
    a_BxNxK = layer_rows.layer_rows(layer, act)
    return out, jnp.einsum("bnk,bnl->kl", a_BxNxK, a_BxNxK)

  # The tapped pass compiled, and the model's own pass (logits and the hidden layer's output) in
  # another (op by op, the two compiled ~25 single ops); the Gram matrices on the host, in float64.
  (logits,), records = jax.jit(lambda v, x: layer_taps.run(
      plan, v, x, layer_taps={k: tap for k in plan.layers}))(variables, x)
  want_logits, inter = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True))(
      variables, x)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-6)
  first, head = sorted(records)
  flat = np.asarray(x, np.float64).reshape(B, -1)
  np.testing.assert_allclose(records[first], flat.T @ flat, rtol=1e-5)
  h = np.maximum(np.asarray(inter["intermediates"]["dense_0"]["__call__"][0], np.float64), 0.0)
  np.testing.assert_allclose(records[head], h.T @ h, rtol=1e-5, atol=1e-6)


def test_sites_uses_and_penultimate():
  def apply_fn(params, x):
    h = jnp.tanh(x @ params["w"] + params["b"]) * params["s"]
    extra, _ = jax.lax.scan(lambda c, r: (c + h @ r, None), jnp.zeros(x.shape[0]), params["rows"])
    return h @ params["head"] + params["c"] + extra[:, None]

  rng = np.random.default_rng(2)
  params = {k: jax.device_put(rng.normal(size=s).astype(np.float32)) for k, s in
            {"w": (4, 5), "b": (5,), "s": (5,), "rows": (2, 5), "head": (5, 3), "c": (3,)}.items()}
  x = jax.device_put(rng.normal(size=(B, 4)).astype(np.float32))
  plan = layer_taps.find_layers(apply_fn, params, x)
  kinds = {plan.paths[i]: sorted({kind for kind, _ in uses}) for i, uses in plan.uses.items()}
  assert kinds == {"['w']": ["layer"], "['b']": ["site"], "['s']": ["site"], "['rows']": ["other"],
                   "['head']": ["layer"], "['c']": ["site"]}
  assert all(site.shape in ((1, 5), (1, 3)) for site in plan.sites.values())
  has_bias = []  # penultimate compiled (op by op, ~25 single ops compiled); its flag, as traced

  def penultimate(p, x):
    h, logits, bias = layer_taps.penultimate(apply_fn, p, x)
    has_bias.append(bias)
    return h, logits

  h, logits = jax.jit(penultimate)(params, x)
  want_h, want_logits = jax.jit(lambda p, x: (jnp.tanh(x @ p["w"] + p["b"]) * p["s"],
                                              apply_fn(p, x)))(params, x)
  np.testing.assert_allclose(h, want_h, rtol=1e-6)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-6)
  assert has_bias == [True]


def test_penultimate_errors():
  ones = lambda *shape: jax.device_put(np.ones(shape, np.float32))  # jnp.ones compiles per shape
  params = {"w": ones(4, 3)}
  with pytest.raises(ConfigError, match="no dense layer"):
    layer_taps.penultimate(lambda p, x: x[:, :3] * p["w"][0], params, ones(B, 4))
  seq_fn = lambda p, x: jnp.mean(x @ p["w"], axis=1)  # the last dense layer sees 5 rows.
  with pytest.raises(ConfigError, match="sees 5 rows per example"):
    layer_taps.penultimate(seq_fn, params, ones(B, 5, 4))
  with pytest.raises(ConfigError, match="same leading"):
    layer_taps.find_layers(lambda p, x: x["a"] @ p["w"], params,
                           {"a": ones(B, 4), "b": ones(B + 1, 4)})


def test_example_axis_not_leading():
  """A time-major model: the dense layer sees (T, B, D); GraNd stays exact."""
  def apply_fn(params, x_BxTxD):
    h = jnp.tanh(jnp.swapaxes(x_BxTxD, 0, 1) @ params["w"])  # (T, B, E)
    return jnp.mean(h, axis=0) @ params["head"]

  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    params = jax.device_put({"w": rng.normal(size=(4, 5)), "head": rng.normal(size=(5, 3))})
    batch = jax.device_put({"x": rng.normal(size=(B, 6, 4)), "y": np.array([0, 1, 2])})
    plan = layer_taps.find_layers(apply_fn, params, batch["x"])
    assert sorted(layer.batch_axis for layer in plan.layers.values()) == [0, 1]
    got = jax.jit(functools.partial(scores.grand, apply_fn))(params, batch)
    # Each example's gradient by one compiled jax.grad, its squared norm summed on the host (op by
    # op, the gradients and sums compiled ~40 single ops).
    grad_one = jax.jit(jax.grad(lambda p, x1, y1: -jax.nn.log_softmax(apply_fn(p, x1))[0, y1]))
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
    want = [np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(
        grad_one(params, x[i:i + 1], y[i])))) for i in range(B)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
