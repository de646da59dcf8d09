"""SparseGPT's per-layer errors under the three calibration orders, on a random 2-block GPT.

    python -m experiments.post_training_orders --seeds=3

For each seed: a random ``GPTClassifier`` (2 blocks, width 16, 2 heads, 8 tokens, padded rows and
positions) is pruned to 50% by SparseGPT with ``sequential="group"`` (input group by input group),
``"block"`` (block by block, the papers' code) and ``False`` (every layer on the dense model),
calibrated on 4 batches of 8 sequences. Two errors per layer, on 4 other batches:

* ``own``: ``pt.layer_errors``, the layer's relative error ``||X W - X W'||^2 / ||X W||^2`` on the
  dense model's inputs ``X`` (what the post-training experiment reports);
* ``out``: the relative error of the layer's output in the pruned model against the dense model
  (errors of the layers before it included), what the accuracy feels.

Numerics only (no timing); seconds on a CPU. The figures are in ``BUILD_NOTES.md`` (issue 24).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from prunejax.masks import posttraining as pt
from prunejax.models import GPTClassifier

flags.DEFINE_integer("seeds", 3, "Random models.")
flags.DEFINE_float("sparsity", 0.5, "Fraction of each layer removed.")
FLAGS = flags.FLAGS
ORDERS = ("group", "block", False)


def _batches(num: int, rows: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    lengths = rng.integers(2, 9, rows)
    x = np.where(np.arange(8)[None] < lengths[:, None], rng.integers(1, 50, (rows, 8)), 0)
    out.append({"x": x.astype(np.int32), "mask": np.arange(rows) < rows - 1,
                "id": np.arange(rows) + rows * i})
  return out


def _outputs(model, params, batches) -> dict[str, np.ndarray]:
  """Every Dense layer's output at the real positions of the real rows, float64."""
  seen: dict = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dense):
      seen.setdefault("/".join(context.module.path), []).append(np.asarray(y, np.float64))
    return y

  for b in batches:
    with nn.intercept_methods(record):
      model.apply({"params": params}, b["x"])
  out = {}
  for name, ys in seen.items():
    out[name] = np.concatenate([
        y[(b["x"] != 0) & b["mask"][:, None]] if y.ndim == 3 else y[b["mask"]]
        for y, b in zip(ys, batches)])
  return out


def main(argv):
  del argv
  model = GPTClassifier(vocab_size=50, num_classes=2, context=8, depth=2, width=16, num_heads=2,
                        pad_id=0)
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  not_pad = lambda x: x != 0
  print("seed layer | own: group block dense | out: group block dense")
  for seed in range(FLAGS.seeds):
    calib, held = _batches(4, 8, seed), _batches(4, 8, 100 + seed)
    params = model.init(jax.random.key(seed), calib[0]["x"])["params"]
    dense_out = _outputs(model, params, held)
    own, out = {}, {}
    for order in ORDERS:
      _, new = pt.sparsegpt(apply_fn, params, calib, FLAGS.sparsity, blocksize=8,
                            sequential=order, token_mask_fn=not_pad)
      own[order] = pt.layer_errors(apply_fn, params, new, held, token_mask_fn=not_pad)
      got = _outputs(model, new, held)
      out[order] = {k: float(((got[k] - v) ** 2).sum() / (v ** 2).sum())
                    for k, v in dense_out.items()}
    for name in own["group"]:
      module = name.rsplit("/", 1)[0]
      print(f"{seed} {module:22s} | " + " ".join(f"{own[o][name]:.4f}" for o in ORDERS) + " | "
            + " ".join(f"{out[o][module]:.4f}" for o in ORDERS))


if __name__ == "__main__":
  app.run(main)
