"""Loss with padding, train steps, optimizers and schedules, and the accuracy the defaults reach."""

import jax
import jax.numpy as jnp
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
  logits = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  y = jnp.array([0, 3, 1, 2, 1])
  pad_logits = jnp.concatenate([logits, 1e3 * jnp.ones((3, 4))])
  batch = {"y": jnp.concatenate([y, jnp.zeros(3, jnp.int32)]),
           "mask": jnp.array([True] * 5 + [False] * 3)}
  mean_padded, _ = train.masked_mean_loss(pad_logits, batch)
  mean_real, _ = train.masked_mean_loss(logits, {"y": y, "mask": jnp.ones(5, bool)})
  ref = sum(-jax.nn.log_softmax(logits[i])[int(y[i])] for i in range(5))
  assert float(mean_padded) * 5 == pytest.approx(float(ref), rel=1e-6)
  assert float(mean_padded) == float(mean_real)


def test_weights_scale_examples():
  logits = jnp.zeros((2, 2))
  batch = {"y": jnp.array([0, 1]), "mask": jnp.array([True, True]), "weight": jnp.array([2.0, 0.0])}
  loss, _ = train.masked_mean_loss(logits, batch)
  assert float(loss) == pytest.approx(np.log(2.0) * 2 / 2)


def test_train_step_ignores_padding_rows():
  model = build_model("mlp", 3, hidden=(8,))
  tx = optax.sgd(0.5)
  state = train.create_train_state(model, tx, jax.random.key(0), jnp.zeros((1, 4)))
  x = jax.random.normal(jax.random.key(1), (5, 4))
  y = jnp.array([0, 1, 2, 1, 0])
  real = {"x": x, "y": y, "mask": jnp.ones(5, bool)}
  padded = {"x": jnp.concatenate([x, 7 * jnp.ones((3, 4))]),
            "y": jnp.concatenate([y, jnp.array([2, 2, 2])]),
            "mask": jnp.array([True] * 5 + [False] * 3)}
  s1, m1 = train.train_step(state, real)
  s2, m2 = train.train_step(state, padded)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s2.params)
  assert float(m1["count"]) == float(m2["count"]) == 5
  assert float(m1["loss_sum"]) == pytest.approx(float(m2["loss_sum"]), rel=1e-6)


def test_step_schedule_and_warmup():
  sched = train.make_schedule(_opt(schedule="step", step_epochs=(2, 4), step_factor=0.2), 10, 6)
  assert float(sched(0)) == pytest.approx(0.1)
  assert float(sched(19)) == pytest.approx(0.1)
  assert float(sched(20)) == pytest.approx(0.02)
  assert float(sched(45)) == pytest.approx(0.004)
  warm = train.make_schedule(_opt(schedule="cosine", warmup_epochs=1), 10, 5)
  assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.05)
  assert float(warm(10)) == pytest.approx(0.1)
  assert float(warm(50)) == pytest.approx(0.0, abs=1e-6)


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
