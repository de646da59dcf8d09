"""The HLO profile of experiments/bench/hlo_profile.py: FLOPs of convolutions and dots against hand
counts and XLA's own cost analysis, categories of a real train step, the GPU forms (cuDNN and cuBLAS
custom calls) on hand-written HLO, and the roofline arithmetic."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.bench import hlo_profile


def _conv(x, w, padding="VALID", stride=1):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _text(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def test_conv_flops_match_hand_count_and_xla():
  x, w = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 4))
  compiled = _text(_conv, x, w)
  costs = hlo_profile.op_costs(compiled.as_text())
  convs = [c for c in costs if c.category == "convolution"]
  hand = 2 * 2 * 7 * 7 * 4 * (3 * 3 * 3)  # 2 x output elements x window size
  assert [c.flops for c in convs] == [hand]
  assert compiled.cost_analysis()["flops"] == hand  # XLA agrees on an unpadded conv
  assert convs[0].flop_dtype == "f32"
  assert convs[0].bytes == 4 * (x.size + w.size + 2 * 7 * 7 * 4)


def test_conv_gradients_count_as_two_more_convolutions():
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  fwd = 2 * 2 * 8 * 8 * 4 * 27  # SAME padding: the padded taps are counted (an upper bound)
  loss = lambda x, w: jnp.sum(_conv(x, w, "SAME") ** 2)
  costs = hlo_profile.op_costs(_text(jax.grad(loss, argnums=(0, 1)), x, w).as_text())
  convs = sorted(c.flops for c in costs if c.category == "convolution")
  assert convs == [fwd, fwd, fwd]  # forward, input gradient, kernel gradient


def test_dot_flops_match_hand_count_and_xla():
  a, b = jnp.ones((5, 7)), jnp.ones((7, 3))
  compiled = _text(jnp.dot, a, b)
  [op] = [c for c in hlo_profile.op_costs(compiled.as_text()) if c.category == "matmul"]
  assert op.flops == 2 * 5 * 7 * 3 == compiled.cost_analysis()["flops"]
  batched = _text(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), jnp.ones((4, 5, 7)),
                  jnp.ones((4, 7, 3)))
  [op] = [c for c in hlo_profile.op_costs(batched.as_text()) if c.category == "matmul"]
  assert op.flops == 2 * 4 * 5 * 7 * 3


def test_casts_and_transposes_have_their_own_categories():
  x = jnp.ones((64, 32))
  cast = hlo_profile.op_costs(_text(lambda x: x.astype(jnp.bfloat16), x).as_text())
  assert [c.category for c in cast] == ["dtype casts"]
  assert cast[0].bytes == 64 * 32 * (4 + 2)
  moved = hlo_profile.op_costs(_text(lambda x: x.T + 0, x).as_text())
  assert {c.category for c in moved} <= {"copy/transpose", "BatchNorm/elementwise"}


def test_train_step_profile_finds_every_category_of_a_convnet():
  from prunejax import train
  from prunejax.models import build_model
  model = build_model("cnn", 10, features=(4, 8), dense=16)
  x = np.zeros((4, 8, 8, 3), np.float32)
  batch = {"x": x, "y": np.arange(4, dtype=np.int32), "mask": np.ones(4, bool)}
  state = train.create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.key(0), x[:1])
  text = jax.jit(train.train_step, donate_argnums=0).lower(state, batch).compile().as_text()
  prof = hlo_profile.profile(text, hlo_profile.chip_peaks(jax.devices()[0]))
  assert prof["convolution"]["ops"] >= 4 and prof["convolution"]["gflop"] > 0
  assert prof["matmul"]["ops"] >= 1
  assert prof["optimizer update"]["ops"] >= 1  # SGD with momentum, found by optax's stack frames
  assert prof["BatchNorm/elementwise"]["ops"] >= 1
  shares = [prof[c]["share"] for c in hlo_profile.CATEGORIES]
  assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
  assert prof["total"]["ops"] == sum(prof[c]["ops"] for c in hlo_profile.CATEGORIES)
  table = hlo_profile.table({"float32": prof}, {"float32": 1.0})
  assert "| optimizer update |" in table and "measured step: float32 1.000 ms" in table


# The GPU forms, written as XLA:GPU prints them (operands with their shapes, tuple results).
_GPU_HLO = """HloModule gpu_like, is_scheduled=true

%fused_relu (param_0: f32[8,32,32,16]) -> f32[8,32,32,16] {
  %param_0 = f32[8,32,32,16]{3,2,1,0} parameter(0)
  %constant_1 = f32[] constant(0)
  %broadcast.1 = f32[8,32,32,16]{3,2,1,0} broadcast(f32[] %constant_1), dimensions={}
  ROOT %maximum.1 = f32[8,32,32,16]{3,2,1,0} maximum(f32[8,32,32,16]{3,2,1,0} %param_0, f32[8,32,32,16]{3,2,1,0} %broadcast.1)
}

ENTRY %main (p0: f32[8,32,32,3], p1: f32[16,3,3,3], p2: bf16[128,64], p3: bf16[64,10]) -> f32[8,32,32,16] {
  %p0 = f32[8,32,32,3]{3,2,1,0} parameter(0)
  %p1 = f32[16,3,3,3]{3,2,1,0} parameter(1)
  %p2 = bf16[128,64]{1,0} parameter(2)
  %p3 = bf16[64,10]{1,0} parameter(3)
  %cudnn-conv = (f32[8,32,32,16]{3,2,1,0}, u8[0]{0}) custom-call(f32[8,32,32,3]{3,2,1,0} %p0, f32[16,3,3,3]{3,2,1,0} %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", backend_config={"conv_result_scale":1}
  %get-tuple-element = f32[8,32,32,16]{3,2,1,0} get-tuple-element((f32[8,32,32,16]{3,2,1,0}, u8[0]{0}) %cudnn-conv), index=0
  %filter-grad = (f32[16,3,3,3]{3,2,1,0}, u8[0]{0}) custom-call(f32[8,32,32,3]{3,2,1,0} %p0, f32[8,32,32,16]{3,2,1,0} %get-tuple-element), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter"
  %gemm = (bf16[128,10]{1,0}, s8[4194304]{0}) custom-call(bf16[128,64]{1,0} %p2, bf16[64,10]{1,0} %p3), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %fusion = f32[8,32,32,16]{3,2,1,0} fusion(f32[8,32,32,16]{3,2,1,0} %get-tuple-element), kind=kLoop, calls=%fused_relu
}
"""


def test_gpu_custom_calls_are_counted():
  costs = {c.name: c for c in hlo_profile.op_costs(_GPU_HLO)}
  assert set(costs) == {"cudnn-conv", "filter-grad", "gemm", "fusion"}  # free ops left out
  fwd = 2 * 8 * 32 * 32 * 16 * 27
  assert costs["cudnn-conv"].category == "convolution" and costs["cudnn-conv"].flops == fwd
  # the kernel gradient costs what the forward conv costs
  assert costs["filter-grad"].category == "convolution" and costs["filter-grad"].flops == fwd
  assert costs["gemm"].category == "matmul" and costs["gemm"].flops == 2 * 128 * 64 * 10
  assert costs["gemm"].flop_dtype == "bf16"
  assert costs["fusion"].category == "BatchNorm/elementwise"
  assert costs["fusion"].bytes == 2 * 4 * 8 * 32 * 32 * 16


def test_roofline_and_chip_peaks():
  h200 = hlo_profile.chip_peaks(types.SimpleNamespace(device_kind="NVIDIA H200",
                                                      platform="gpu"))
  assert h200.name == "H200" and not h200.nominal
  unknown = hlo_profile.chip_peaks(types.SimpleNamespace(device_kind="Mystery", platform="gpu"))
  assert unknown.nominal and "assumed" in unknown.name
  assert hlo_profile.chip_peaks(jax.devices("cpu")[0]).nominal
  prof = hlo_profile.profile(_GPU_HLO, h200)
  fwd = 2 * 8 * 32 * 32 * 16 * 27
  conv_bytes = 4 * (8 * 32 * 32 * 3 + 16 * 27 + 8 * 32 * 32 * 16)
  one_conv = max(fwd / h200.tf32_flops, conv_bytes / h200.bytes_per_s) + h200.per_op_s
  filt_bytes = 4 * (8 * 32 * 32 * 3 + 8 * 32 * 32 * 16 + 16 * 27)
  other_conv = max(fwd / h200.tf32_flops, filt_bytes / h200.bytes_per_s) + h200.per_op_s
  assert prof["convolution"]["est_ms"] == pytest.approx(1e3 * (one_conv + other_conv))
  assert prof["total"]["share"] == 1.0


def test_text_without_entry_is_an_error():
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_profile.op_costs("HloModule empty\n")
