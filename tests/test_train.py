"""Loss with padding, train steps, optimizers and schedules, and the accuracy the defaults reach."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from prunejax import data, parallel, train
from prunejax.errors import ConfigError
from prunejax.models import build_model


def _opt(**kw):
  base = dict(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0,
              schedule="constant", warmup_epochs=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_padded_batch_gives_exactly_the_summed_loss_of_real_examples():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  y = np.array([0, 3, 1, 2, 1], np.int32)
  pad_logits = np.concatenate([logits, 1e3 * np.ones((3, 4), np.float32)])
  batch = {"y": np.concatenate([y, np.zeros(3, np.int32)]),
           "mask": np.array([True] * 5 + [False] * 3)}
  # Both losses from one compiled program (op by op, each call compiled ~25 single ops).
  mean_padded, mean_real = jax.jit(lambda *a: [train.masked_mean_loss(*ab)[0] for ab in a])(
      (pad_logits, batch), (logits, {"y": y, "mask": np.ones(5, bool)}))
  z = logits.astype(np.float64)  # the reference: float64 log-softmax of each row, on the host
  ref = sum(np.log(np.sum(np.exp(z[i] - z[i].max()))) + z[i].max() - z[i, y[i]] for i in range(5))
  assert float(mean_padded) * 5 == pytest.approx(float(ref), rel=1e-6)
  assert float(mean_padded) == float(mean_real)


def test_weights_scale_examples():
  batch = {"y": np.array([0, 1]), "mask": np.array([True, True]), "weight": np.array([2.0, 0.0])}
  loss, _ = jax.jit(train.masked_mean_loss)(np.zeros((2, 2), np.float32), batch)
  assert float(loss) == pytest.approx(np.log(2.0) * 2 / 2)


def test_train_step_ignores_padding_rows():
  model = build_model("mlp", 3, hidden=(8,))
  tx = optax.sgd(0.5)
  state = train.create_train_state(model, tx, jax.random.key(0), np.zeros((1, 4), np.float32))
  x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
  y = np.array([0, 1, 2, 1, 0], np.int32)
  real = {"x": x, "y": y, "mask": np.ones(5, bool)}
  padded = {"x": np.concatenate([x, 7 * np.ones((3, 4), np.float32)]),
            "y": np.concatenate([y, np.array([2, 2, 2], np.int32)]),
            "mask": np.array([True] * 5 + [False] * 3)}
  # Both steps in one compiled program, as the trainer runs a step (op by op: ~130 single ops).
  (s1, m1), (s2, m2) = jax.jit(lambda s, a, b: (train.train_step(s, a), train.train_step(s, b)))(
      state, real, padded)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s2.params)
  assert float(m1["count"]) == float(m2["count"]) == 5
  assert float(m1["loss_sum"]) == pytest.approx(float(m2["loss_sum"]), rel=1e-6)


def _at(sched, *steps: int) -> list[float]:
  """``sched`` at int32 steps, as the optimizer calls it, in one compiled program (op by op, each
  schedule compiled ~7 single ops)."""
  return [float(v) for v in jax.jit(lambda s: [sched(i) for i in s])(np.array(steps, np.int32))]


def test_step_schedule_and_warmup():
  sched = train.make_schedule(_opt(schedule="step", step_epochs=(2, 4), step_factor=0.2), 10, 6)
  s0, s19, s20, s45 = _at(sched, 0, 19, 20, 45)
  assert s0 == pytest.approx(0.1)
  assert s19 == pytest.approx(0.1)
  assert s20 == pytest.approx(0.02)
  assert s45 == pytest.approx(0.004)
  warm = train.make_schedule(_opt(schedule="cosine", warmup_epochs=1), 10, 5)
  w0, w5, w10, w50 = _at(warm, 0, 5, 10, 50)
  assert w0 == 0.0 and w5 == pytest.approx(0.05)
  assert w10 == pytest.approx(0.1)
  assert w50 == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("name", "lion", r"optimizer.name='lion' is not allowed; choose one of: 'sgd', 'adamw', 'adam'"),
    ("schedule", "linear", r"optimizer.schedule='linear' is not allowed"),
    ("lr", -1.0, r"optimizer.lr=-1.0 is out of range"),
    ("momentum", 1.5, r"optimizer.momentum=1.5 is out of range"),
])
def test_bad_optimizer_config_is_one_line_error(field, value, match):
  with pytest.raises(ConfigError, match=match) as e:
    train.make_optimizer(_opt(**{field: value}), 10, 5)
  assert "\n" not in str(e.value)


def test_digits_mlp_reaches_97_percent():
  ds = data.load_digits()
  model = build_model("mlp", 10)
  epochs, bs = 20, 32
  tx = train.make_optimizer(_opt(lr=0.1, nesterov=True, weight_decay=1e-3, schedule="cosine"),
                            data.num_batches(len(ds.train), bs), epochs)
  mesh = parallel.data_mesh()
  state = parallel.replicate(train.create_train_state(
      model, tx, jax.random.key(0), ds.train.example(), ds.preprocess()), mesh)
  step = train.plain_step(train.jit_train_step)
  for epoch in range(epochs):
    state, _, metrics, steps = train.run_epoch(
        state, data.batches(ds.train, batch_size=bs, seed=0, epoch=epoch), step, mesh)
    assert steps == data.num_batches(len(ds.train), bs)
    assert train.summarize(metrics)["count"] == len(ds.train)
  result = train.evaluate(state, data.batches(ds.test, batch_size=128, shuffle=False), mesh)
  assert result["count"] == len(ds.test)
  assert result["accuracy"] >= 0.97
