"""Data-importance scores: rank every training example.

Per-batch scores share one contract, ``fn(apply_fn, params, batch) -> f32[B]`` (0 on padding rows),
and are listed in :data:`SCORES`:

* :mod:`~prunejax.scores.output`: ``el2n``, ``loss``, ``margin``, ``entropy``.
* :mod:`~prunejax.scores.grand`: ``grand`` (exact, per-layer ghost norms), ``grand_last_layer``, and
  the ``vmap(grad)`` / ``jacrev`` references.

Scores over training are ``(init, update)`` trackers in :mod:`~prunejax.scores.dynamics`
(``forgetting``, ``cartography``, ``aum``, ``running_mean``); dataset-level scores are
:func:`prototypes` and the Confident-Learning label-quality tools of
:mod:`~prunejax.scores.label_quality`. :func:`save_scores` / :func:`load_scores` store scores by id.

:data:`HIGHER_IS_HARDER` gives each score's direction; :mod:`prunejax.select` expects high = hard,
so negate the others before selecting.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from prunejax.errors import check_choice
from prunejax.layer_taps import penultimate
from prunejax.scores.dynamics import (CartographyState, ForgettingState, MeanState, Tracker, aum,
                                      average_over_checkpoints, cartography, forgetting,
                                      running_mean)
from prunejax.scores.grand import (GhostPlan, ghost_plan, grand, grand_jacrev, grand_last_layer,
                                   grand_vmap)
from prunejax.scores.io import align, load_scores, save_scores
from prunejax.scores.label_quality import (confident_joint, find_label_issues, normalized_margin,
                                           out_of_fold_probs, self_confidence, stratified_folds)
from prunejax.scores.output import el2n, entropy, loss, margin
from prunejax.scores.prototypes import kmeans, prototypes
from prunejax.types import ApplyFn, Params, Batch, Scores

SCORES: dict[str, Callable[..., Scores]] = {
    "el2n": el2n,
    "loss": loss,
    "margin": margin,
    "entropy": entropy,
    "grand": grand,
    "grand_last_layer": grand_last_layer,
}

HIGHER_IS_HARDER: dict[str, bool] = {
    "el2n": True, "loss": True, "margin": False, "entropy": True, "grand": True,
    "grand_last_layer": True, "forgetting": True, "aum": False, "confidence": False,
    "variability": True, "prototypes": True, "self_confidence": False,
    "normalized_margin": False,
}


def jit_score(score: str | Callable[..., Scores], apply_fn: ApplyFn,
              **kwargs: Any) -> Callable[[Params, Batch], Scores]:
  """``jax.jit`` of ``score(apply_fn, params, batch, **kwargs)`` as a function of (params, batch).

  ``apply_fn`` and ``kwargs`` are fixed; params are arguments, so a new checkpoint of the same
  shapes reuses the compiled function.
  """
  if isinstance(score, str):
    check_choice("score", score, SCORES)
  fn = SCORES[score] if isinstance(score, str) else score
  return jax.jit(functools.partial(fn, apply_fn, **kwargs))
