"""FLOPs of one compiled train step, from XLA's cost analysis (nothing is run or allocated).

    python -m experiments.step_flops --model=resnet18 --batch_size=128 --image_size=32

The paper-scale configs' run-time estimates come from these figures (see their docstrings).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from prunejax import train
from prunejax.models import MODELS, build_model

flags.DEFINE_enum("model", "resnet18", MODELS, "Model.")
flags.DEFINE_integer("batch_size", 128, "Examples per step.")
flags.DEFINE_integer("image_size", 32, "Image side (image models).")
flags.DEFINE_integer("tokens", 64, "Tokens per example (gpt).")
flags.DEFINE_integer("num_classes", 10, "Classes.")
FLAGS = flags.FLAGS


def step_flops(model, x_example, batch_size: int) -> float:
  """FLOPs of one SGD-momentum train step at ``batch_size``, by XLA's cost analysis."""
  state = jax.eval_shape(lambda: train.create_train_state(
      model, optax.sgd(0.1, momentum=0.9), jax.random.key(0), x_example))
  batch = {"x": jax.ShapeDtypeStruct((batch_size,) + x_example.shape[1:], x_example.dtype),
           "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
           "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}
  cost = jax.jit(train.train_step).lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def main(argv):
  del argv
  if FLAGS.model == "gpt":
    model = build_model("gpt", FLAGS.num_classes, vocab_size=8192, context=FLAGS.tokens)
    x = jnp.ones((1, FLAGS.tokens), jnp.int32)
  else:
    model = build_model(FLAGS.model, FLAGS.num_classes)
    channels = 1 if FLAGS.model in ("mlp", "cnn") else 3
    x = jnp.zeros((1, FLAGS.image_size, FLAGS.image_size, channels))
  flops = step_flops(model, x, FLAGS.batch_size)
  print(f"{FLAGS.model}: {flops / 1e9:.1f} GFLOPs per train step at batch {FLAGS.batch_size}")


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.step_flops``)."""
  app.run(main)


if __name__ == "__main__":
  cli()
