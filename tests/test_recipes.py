"""The recipes in docs/ run as they are, and their results equal independent references.

Each page's ``python`` blocks run in order in one namespace. Then: EL2N and GraNd equal a float64
per-example ``jax.grad`` loop (and the kept ids a NumPy ranking of it); the global magnitude mask
equals a NumPy stable sort over the leaves the page says are prunable; ``prunejax.optim.masked`` in
the page's own optax loop equals a hand-masked optax loop; InfoBatch in the page's own loop visits,
weights and records exactly what a dict-by-id re-implementation of the paper's rule does; and the
model rebuilt in the framework gives the logits of ``apply_fn`` with the trained params.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import masks

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


# The rebuilt models' forward passes are compiled (op by op, each compiled ~14 single ops).
def _nnx_back(ns):
  from flax import nnx
  params_back = nnx.state(ns["pruned_model"], nnx.Param)
  return nnx.jit(lambda model, x: model(x))(ns["pruned_model"], ns["batch"]["x"]), params_back


def _equinox_back(ns):
  import equinox as eqx
  logits = eqx.filter_jit(lambda model, x: jax.vmap(model)(x))(ns["pruned_model"],
                                                                 ns["batch"]["x"])
  return logits, eqx.filter(ns["pruned_model"], eqx.is_inexact_array)


PAGES = {
    # page: (the paths the page's filter should prune, the rebuilt model's logits and params)
    "nnx": (lambda path: path.endswith("/kernel"), _nnx_back),
    "equinox": (lambda path: path in ("hidden/weight", "out/weight"), _equinox_back),
    "haiku": (lambda path: path.endswith("/w"), lambda ns: (ns["logits"], ns["pruned_params"])),
    "plain_jax": (lambda path: path in ("W_in", "W_out"), None),
}


def code_blocks(page: str) -> list[str]:
  text = (DOCS / f"{page}.md").read_text()
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture(scope="module", params=sorted(PAGES))
def recipe(request):
  """``(page, [(code, namespace before, namespace after) for each block])``."""
  ns: dict = {"__name__": f"recipe_{request.param}"}
  steps = []
  for code in code_blocks(request.param):
    before = dict(ns)
    exec(compile(code, f"docs/{request.param}.md", "exec"), ns)  # noqa: S102
    steps.append((code, before, dict(ns)))
  return request.param, steps


def _after(steps, name):
  """The namespace right after the block that first defines ``name``."""
  return next(after for _, before, after in steps if name in after and name not in before)


def _f64(tree):
  """``tree`` in float64 on the device, converted on the host (jnp.asarray compiled one
  conversion per leaf shape)."""
  return jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float64), tree))


def _leaves_close(a, b, **kw):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_every_page_has_its_blocks():
  for page in PAGES:
    blocks = code_blocks(page)
    assert len(blocks) >= 4, page
    assert any("prunejax.optim.masked" in b for b in blocks), page
    assert any("prunejax.online.infobatch_update" in b for b in blocks), page


def test_scores_equal_a_float64_per_example_grad_loop(recipe):
  page, steps = recipe
  ns = _after(steps, "grand_B")
  apply_fn, batch = ns["apply_fn"], ns["batch"]
  real = np.asarray(batch["mask"])
  with jax.enable_x64(True):
    params = _f64(ns["params"])
    x = np.asarray(batch["x"], np.float64)
    y = np.asarray(batch["y"])

    def ce(p, x_1xD, y_1):
      logits = apply_fn(p, x_1xD)[0]
      return jax.nn.logsumexp(logits) - logits[y_1], logits

    # One compiled function gives an example's gradient and its logits; the sums run on the host
    # (op by op, the forward pass and the sums compiled ~15 single ops per page).
    grad_fn = jax.jit(jax.grad(ce, has_aux=True))
    grand_ref, el2n_ref = np.zeros(len(y)), np.zeros(len(y))
    for i in np.flatnonzero(real):
      g, logits = grad_fn(params, x[i:i + 1], int(y[i]))
      grand_ref[i] = np.sqrt(sum(np.sum(np.asarray(leaf) ** 2) for leaf in jax.tree.leaves(g)))
      logits = np.asarray(logits)
      prob = np.exp(logits - logits.max())
      prob /= prob.sum()
      el2n_ref[i] = np.linalg.norm(prob - np.eye(len(prob))[y[i]])
  assert np.all(grand_ref[real] > 0)
  np.testing.assert_allclose(np.asarray(ns["grand_B"]), grand_ref, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(ns["el2n_B"]), el2n_ref, rtol=1e-5, atol=1e-7)
  ids = np.asarray(batch["id"])[real]
  hardest = ids[np.lexsort((ids, -grand_ref[real]))][:4]  # floor(0.5 * 7 + 0.5) = 4 kept.
  np.testing.assert_array_equal(ns["keep_ids"], np.sort(hardest))


def test_magnitude_mask_equals_a_numpy_sort(recipe):
  page, steps = recipe
  prunable, _ = PAGES[page]
  ns = _after(steps, "mask")
  paths = masks.leaf_paths(ns["params"])
  leaves = [np.asarray(l) for l in jax.tree.leaves(ns["params"])]
  chosen = [i for i, p in enumerate(paths) if prunable(p)]
  assert len(chosen) >= 2, paths
  flat = np.concatenate([np.abs(leaves[i]).ravel() for i in chosen])
  k = round(ns["sparsity"] * flat.size)
  pruned = np.zeros(flat.size, bool)
  pruned[np.argsort(flat, kind="stable")[:k]] = True
  got = [np.asarray(m) for m in jax.tree.leaves(ns["mask"])]
  offset = 0
  for i, (path, leaf) in enumerate(zip(paths, leaves)):
    if i in chosen:
      np.testing.assert_array_equal(got[i], ~pruned[offset:offset + leaf.size].reshape(leaf.shape),
                                    err_msg=path)
      offset += leaf.size
    else:
      assert got[i].all(), path
  assert float(masks.sparsity_of(ns["mask"])) == pytest.approx(k / flat.size)


def test_masked_optax_loop_equals_a_hand_masked_loop(recipe):
  page, steps = recipe
  before, after = next((b, a) for code, b, a in steps if "prunejax.optim.masked" in code)
  mask, batch, loss_fn, inner = before["mask"], before["batch"], after["loss_fn"], after["inner"]

  @jax.jit
  def hand_masked_step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, mask)
    updates, state = inner.update(grads, state, params)
    params = jax.tree.map(lambda p, u, m: jnp.where(m, p + u, 0.0), params, updates, mask)
    return params, state

  params, state = before["params"], inner.init(before["params"])
  for _ in range(after["num_steps"]):
    params, state = hand_masked_step(params, state)
  _leaves_close(after["params"], params, rtol=1e-5, atol=1e-6)
  for p, p0, m in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"]),
                      jax.tree.leaves(mask)):
    p, p0, m = np.asarray(p), np.asarray(p0), np.asarray(m)
    assert np.all(p[~m] == 0.0)
    assert np.all(p[m] != p0[m])
  pruned_start = masks.apply_mask(before["params"], mask)
  loss = jax.jit(loss_fn)  # one compile for both (op by op, ~25 single ops compiled)
  assert float(loss(after["params"], batch)) < float(loss(pruned_start, batch))


def test_the_rebuilt_model_has_the_trained_params(recipe):
  page, steps = recipe
  ns = steps[-1][2]
  back = PAGES[page][1]
  if back is None:  # a plain function has nothing to rebuild; its page ends with a layout.
    w = np.asarray(ns["params"]["W_in"], np.float64)
    keep = np.ones(w.shape[1], bool)
    keep[np.argsort(np.sum(w ** 2, axis=0), kind="stable")[:w.shape[1] // 2]] = False
    np.testing.assert_array_equal(ns["neuron_mask"]["W_in"], np.broadcast_to(keep, w.shape))
    np.testing.assert_array_equal(ns["neuron_mask"]["b_in"], keep)
    assert np.all(np.asarray(ns["neuron_mask"]["W_out"]))
    assert np.all(np.asarray(ns["neuron_mask"]["b_out"]))
    return
  logits, params_back = back(ns)
  np.testing.assert_allclose(np.asarray(logits),
                             np.asarray(jax.jit(ns["apply_fn"])(ns["params"], ns["batch"]["x"])),
                             rtol=1e-6, atol=1e-6)
  _leaves_close(params_back, ns["params"], rtol=0, atol=0)


def test_infobatch_loop_equals_a_reference_keyed_by_id(recipe):
  """The page's loop with prunejax's InfoBatch state against the same loop with a dict of last
  losses by id and the rule of Qin et al. written out: drop a well-learned example (last loss below
  the mean) with probability r, weight the kept ones 1 / (1 - r), prune only before epoch
  delta * num_epochs."""
  page, steps = recipe
  before, after = next((b, a) for code, b, a in steps if "infobatch_update" in code)
  r, delta, num_epochs = after["prune_ratio"], after["delta"], after["num_epochs"]
  ids = np.asarray(after["train_set"]["id"])
  last_loss = {int(i): 3.0 for i in ids}  # InfoBatch's initial score: epoch 0 keeps everything.
  params, opt_state = before["params"], before["opt_state"]
  for epoch in range(num_epochs):
    order_ids = np.array(sorted(last_loss))
    loss_N = np.array([last_loss[i] for i in order_ids], np.float32)
    draws = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.key(1), epoch),
                                          (len(order_ids),)))
    well_learned = (loss_N < loss_N.mean()) & (epoch < delta * num_epochs)
    drop = well_learned & (draws < r)
    epoch_ids = order_ids[~drop]
    epoch_weights = np.where(well_learned, 1.0 / (1.0 - r), 1.0)[~drop]
    np.testing.assert_array_equal(after["visited"][epoch], epoch_ids)
    order = np.random.default_rng(epoch).permutation(len(epoch_ids))
    for start in range(0, len(order), after["batch_size"]):
      chunk = order[start:start + after["batch_size"]]
      batch = after["make_batch"](epoch_ids[chunk], epoch_weights[chunk])
      params, opt_state, ce_B = after["weighted_step"](params, opt_state, batch)
      for i, ce, real in zip(np.asarray(batch["id"]), np.asarray(ce_B), np.asarray(batch["mask"])):
        if real:
          last_loss[int(i)] = float(ce)
  sizes = [len(v) for v in after["visited"]]
  assert sizes[0] == len(ids) and sizes[1] < len(ids) and sizes[2:] == [len(ids)] * 2
  np.testing.assert_array_equal(np.asarray(after["ib_state"].ids_N), np.sort(ids))
  np.testing.assert_array_equal(np.asarray(after["ib_state"].scores_N),
                                np.array([last_loss[int(i)] for i in np.sort(ids)], np.float32))
  _leaves_close(after["params"], params, rtol=1e-6, atol=1e-7)
  for p, m in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["mask"])):
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)  # the weight mask still holds.
