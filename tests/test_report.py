"""Reporting: sparsity per layer and overall, remaining parameters, FLOPs before and after."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import masks, report
from prunejax.models import CNN, MLP


def _random_params(model, x, seed=0):
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


def test_sparsity_report_and_remaining_params_by_hand():
  params = {"a": {"kernel": jnp.asarray([[1.0, 0.0], [2.0, 3.0]]), "bias": jnp.zeros((2,))},
            "b": {"kernel": jnp.asarray([[0.0, 0.0, 5.0]])}}
  r = report.sparsity_report(params)  # no mask: zeros count as pruned.
  assert r["layers"] == {"a/kernel": {"size": 4, "remaining": 3, "sparsity": 0.25},
                         "b/kernel": {"size": 3, "remaining": 1, "sparsity": pytest.approx(2 / 3)}}
  assert r["prunable"] == {"size": 7, "remaining": 4, "sparsity": pytest.approx(3 / 7)}
  assert r["total"]["size"] == 9 and r["total"]["remaining"] == 4
  mask = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
  mask["b"]["kernel"] = jnp.asarray([[True, False, False]])
  assert report.sparsity_report(params, mask)["layers"]["b/kernel"]["remaining"] == 1
  assert report.remaining_params(params, mask) == 4 + 2 + 1
  assert report.remaining_params(params) == 4
  assert "a/kernel" in report.format_report(r)


def test_xla_flops_match_the_analytic_count_of_a_dense_mlp():
  model = MLP(num_classes=10, hidden=(64,))
  x = jnp.ones((8, 32))
  params = _random_params(model, x)
  analytic = 2 * 8 * (32 * 64 + 64 * 10)
  lin = report.linear_flops(model, params, x)
  assert lin["dense_0"]["dense"] == 2 * 8 * 32 * 64
  assert lin["total"]["dense"] == lin["total"]["sparse"] == analytic
  xla = report.forward_flops(lambda p, x: model.apply({"params": p}, x), params, x)
  assert analytic <= xla <= 1.05 * analytic  # XLA adds bias adds and ReLUs.


def test_linear_flops_of_conv_layers_and_sparse_counts():
  model = CNN(num_classes=3, features=(4,), dense=8)
  x = jnp.ones((2, 8, 8, 3))
  params = _random_params(model, x)
  mask = masks.magnitude(params, 0.5, scope="layerwise")
  lin = report.linear_flops(model, params, x, mask)
  assert lin["conv_0"]["dense"] == 2 * 2 * 8 * 8 * (3 * 3 * 3 * 4)
  assert lin["conv_0"]["sparse"] == 2 * 2 * 8 * 8 * round(0.5 * 3 * 3 * 3 * 4)
  assert lin["total"]["sparse"] == pytest.approx(0.5 * lin["total"]["dense"], rel=0.02)


def test_pruning_report_before_and_after_compaction():
  model = MLP(num_classes=10, hidden=(64, 64))
  x = jnp.ones((8, 32))
  params = _random_params(model, x)
  mask = masks.neurons(params, 0.5)
  compacted = masks.compact(model, params, mask)
  r = report.pruning_report(model, params, x, mask, compacted=compacted)
  assert r["params_before"] == 32 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
  assert r["params_compacted"] == 32 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
  assert r["xla_flops_compacted"] < 0.5 * r["xla_flops_before"]
  assert r["linear_flops_after"] < r["linear_flops_before"]
  assert "xla_flops_compacted" in report.format_report(r)


def test_step_flops_script_counts_a_dense_train_step():
  """The FLOPs script behind the configs' run-time estimates agrees with a hand count for an MLP:
  matmuls of 2*B*in*out each; forward, weight gradients, and input gradients of all but the first
  layer (its input needs none)."""
  import jax.numpy as jnp
  from experiments.step_flops import step_flops
  from prunejax.models import MLP
  flops = step_flops(MLP(10, hidden=(64,)), jnp.zeros((1, 8, 8, 1)), 32)
  first, second = 2 * 32 * 64 * 64, 2 * 32 * 64 * 10
  matmuls = 3 * (first + second) - first
  assert matmuls <= flops < 1.1 * matmuls  # the rest is elementwise work
