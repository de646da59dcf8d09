"""The registry of mask methods: one contract for every way of choosing weights to prune.

A :class:`MaskMethod` turns params (and, where it needs them, an ``apply_fn``, a batch, a PRNG key or an
input shape, gathered in :class:`MaskInputs`) into importance scores with the structure of the params
(higher = keep), and :func:`~prunejax.masks.mask_from_scores` prunes the lowest to an exact sparsity,
globally or per layer. A method that re-scores while it prunes (SynFlow's 100 rounds of its scores on
the masked params) gives its own ``mask_fn``. Experiments, config validation and the generic
tests read :data:`METHODS`; adding a method is its scores function plus one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

import numpy as np

from prunejax.errors import ConfigError, DataError
from prunejax.masks.core import check_finite_params, path_str
from prunejax.masks import fisher
from prunejax.masks import posttraining as pt
from prunejax.masks import unstructured as un
from prunejax.types import ApplyFn, Batch, FilterFn, Mask, Params, PyTree


@dataclasses.dataclass
class MaskInputs:
  """What a mask method may use besides the params.

  Attributes:
    apply_fn: ``apply_fn(params, x) -> logits`` over exactly the params being pruned.
    batch: a batch dict (``x``, ``y``, optionally ``mask``) for data-dependent methods.
    key: a PRNG key for random methods.
    input_shape: the model's input shape, batch axis included, for data-free methods (SynFlow).
  """

  apply_fn: ApplyFn | None = None
  batch: Batch | None = None
  key: jax.Array | None = None
  input_shape: Sequence[int] | None = None


@dataclasses.dataclass(frozen=True)
class MaskMethod:
  """A registered mask method.

  Attributes:
    name: the name configs use.
    scores: ``scores(params, inputs) -> pytree`` of importances, higher kept.
    needs: the :class:`MaskInputs` fields it uses (checked before calling it).
    mask_fn: ``mask_fn(params, sparsity, inputs, scope=, filter_fn=, distribution=) -> mask`` for
      methods that apply their scores iteratively; None: one ``mask_from_scores`` of ``scores``.
    description: one line for listings.
  """

  name: str
  scores: Callable[[Params, MaskInputs], PyTree]
  needs: tuple[str, ...] = ()
  mask_fn: Callable[..., Mask] | None = None
  description: str = ""

  @property
  def data_free(self) -> bool:
    return "batch" not in self.needs

  def mask(self, params: Params, sparsity: Any, inputs: MaskInputs | None = None, *,
           scope: str = "global", filter_fn: FilterFn | None = None,
           distribution: str | Mapping[str, float] | None = None) -> Mask:
    """The mask of this method at ``sparsity`` (see :func:`~prunejax.masks.mask_from_scores`)."""
    inputs = inputs or MaskInputs()
    missing = [n for n in self.needs if getattr(inputs, n) is None]
    if missing:
      raise ConfigError(f"mask method {self.name!r} needs {', '.join(missing)} in its MaskInputs")
    inputs = self._checked(params, inputs)
    kw = dict(scope=scope, filter_fn=filter_fn, distribution=distribution)
    if self.mask_fn is not None:
      return self.mask_fn(params, sparsity, inputs, **kw)
    return un.mask_from_scores(self.scores(params, inputs), sparsity, **kw)


  def _checked(self, params: Params, inputs: MaskInputs) -> MaskInputs:
    """The inputs after the checks every method needs, so that no method ranks NaN scores or
    fails inside JAX: finite params (float ones for the methods that differentiate or run the
    model), a batch whose real rows are finite (non-finite padding rows are zeroed: they count for
    nothing), labels in ``[0, C)``, and ``apply_fn`` that runs on the batch or input shape."""
    leaves = [(p, l) for p, l in jax.tree_util.tree_flatten_with_path(params)[0]
              if hasattr(l, "dtype")]
    floats = [(p, l) for p, l in leaves if jnp.issubdtype(l.dtype, jnp.inexact)]
    if leaves and not floats and self.name not in ("magnitude", "random"):
      raise DataError(f"mask method {self.name!r} differentiates or runs the model, but no params "
                      f"leaf is float (e.g. {path_str(leaves[0][0])}: {leaves[0][1].dtype})")
    check_finite_params(params, f"mask method {self.name!r}")
    x = None
    if "batch" in self.needs:
      batch = pt._check_batch(0, inputs.batch)  # pylint: disable=protected-access
      inputs = dataclasses.replace(inputs, batch=batch)
      x = batch["x"]
    elif "input_shape" in self.needs:
      x = jax.ShapeDtypeStruct(tuple(inputs.input_shape), jnp.float32)
    if x is not None and inputs.apply_fn is not None:
      try:
        out = jax.eval_shape(inputs.apply_fn, params, x)
      except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"mask method {self.name!r}: apply_fn(params, x) fails on x of shape "
                        f"{jax.tree.map(jnp.shape, x)} ({type(e).__name__}: {first}); does the "
                        f"input match the model?") from e
      if "batch" in self.needs and "y" in inputs.batch:
        y = np.asarray(inputs.batch["y"])
        num_classes = jax.tree.leaves(out)[0].shape[-1]
        m = np.asarray(inputs.batch.get("mask", np.ones(y.shape, bool)), bool)
        if not np.issubdtype(y.dtype, np.integer):
          raise DataError(f"mask method {self.name!r}: batch['y'] has dtype {y.dtype}; labels must "
                          f"be integers in [0, {num_classes})")
        bad = m & ((y < 0) | (y >= num_classes))
        if bad.any():
          raise DataError(f"mask method {self.name!r}: batch['y'] has {int(bad.sum())} labels "
                          f"outside [0, {num_classes}) (e.g. {y[bad][:3].tolist()})")
    return inputs


def _random_scores(params, inputs):
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [jax.random.uniform(jax.random.fold_in(inputs.key, i),
                                                         jnp.shape(l))
                                      for i, l in enumerate(leaves)])


METHODS: dict[str, MaskMethod] = {m.name: m for m in (
    MaskMethod("magnitude", lambda p, _: jax.tree.map(jnp.abs, p),
               mask_fn=lambda p, s, _, **kw: un.magnitude(p, s, **kw),
               description="smallest |w| (Han et al. 2015; lottery tickets)"),
    MaskMethod("random", _random_scores, needs=("key",),
               mask_fn=lambda p, s, i, **kw: un.random(p, s, key=i.key, **kw),
               description="uniformly random weights (the honest baseline)"),
    MaskMethod("snip", lambda p, i: un._snip_scores_jit(i.apply_fn, p, i.batch),
               needs=("apply_fn", "batch"), description="|w * dL/dw| on one batch (Lee 2019)"),
    MaskMethod("grasp", lambda p, i: jax.tree.map(
        jnp.negative, un._grasp_scores_jit(i.apply_fn, p, i.batch)),
               needs=("apply_fn", "batch"),
               description="keep what preserves gradient flow: -(-w * Hg) (Wang 2020)"),
    MaskMethod("fisher", lambda p, i: fisher.fisher_scores_jit(i.apply_fn, p, i.batch),
               needs=("apply_fn", "batch"),
               description="OBD with the empirical Fisher diagonal, 0.5 w^2 E[g^2] (Theis 2018)"),
    MaskMethod("wanda", lambda p, i: pt.wanda_scores(i.apply_fn, p, [i.batch]),
               needs=("apply_fn", "batch"),
               mask_fn=lambda p, s, i, **kw: pt.wanda(i.apply_fn, p, [i.batch], s, **kw),
               description="|w| * ||x_j|| on calibration inputs, layer by layer (Sun et al. 2023)"),
    MaskMethod("sparsegpt", lambda p, i: pt.sparsegpt_scores(i.apply_fn, p, [i.batch]),
               needs=("apply_fn", "batch"),
               mask_fn=lambda p, s, i, **kw: pt.sparsegpt(i.apply_fn, p, [i.batch], s, **kw)[0],
               description="OBS reconstruction layer by layer, the mask only (Frantar 2023)"),
    MaskMethod("synflow", lambda p, i: un.synflow_scores(i.apply_fn, p, i.input_shape),
               needs=("apply_fn", "input_shape"),
               mask_fn=lambda p, s, i, **kw: un.synflow(i.apply_fn, p, s, i.input_shape, **kw),
               description="data-free synaptic flow, 100 rounds of its scores (Tanaka 2020)"),
)}
"""Every registered mask method by name."""
