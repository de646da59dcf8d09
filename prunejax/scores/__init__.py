"""Data-importance scores: rank every training example.

Per-batch scores share one contract, ``fn(apply_fn, params, batch) -> f32[B]`` (0 on padding rows).
:data:`SCORES` (:mod:`~prunejax.scores.registry`) registers every score with its direction and cost:

* :mod:`~prunejax.scores.output`: ``el2n``, ``loss``, ``margin``, ``entropy``.
* :mod:`~prunejax.scores.grand`: ``grand`` (exact, per-layer ghost norms), ``grand_last_layer``, and
  the ``vmap(grad)`` / ``jacrev`` references.
* :mod:`~prunejax.scores.gradient_dot`: ``gradient_dot`` (exact per-example ``<g_i, target>`` by one
  forward-mode pass) and ``mean_gradient`` (a target set's gradient);
  :mod:`~prunejax.scores.gradient_features`: ``gradient_features`` (Kronecker-projected per-example
  gradients, LoGra; Adam-preconditioned for LESS); :mod:`~prunejax.scores.influence`: the
  selections ``tracin`` and ``less`` (registered with kind ``"selection"``).

Scores over training are ``(init, update)`` trackers in :mod:`~prunejax.scores.dynamics`
(``forgetting``, ``cartography``, ``aum``, ``running_mean``); dataset-level scores are
:func:`prototypes` and the Confident-Learning label-quality tools of
:mod:`~prunejax.scores.label_quality` (with cleanlab's own signatures in
:mod:`~prunejax.scores.cleanlab_compat`). :func:`save_scores` / :func:`load_scores` store scores by id.

:data:`HIGHER_IS_HARDER` gives each score's direction; :mod:`prunejax.select` expects high = hard,
so negate the others before selecting (``SCORES[name].hardness(scores)``). :func:`score_dataset` runs
a per-batch score over a whole stream of batches, keyed by id.
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
from prunejax.scores.gradient_dot import check_target, gradient_dot, mean_gradient
from prunejax.scores.gradient_features import (FeaturePlan, adam_moments, feature_plan,
                                               gradient_features)
from prunejax.scores.influence import less, tracin
from prunejax.scores.io import align, load_scores, save_scores
from prunejax.scores import cleanlab_compat
from prunejax.scores.label_quality import (confidence_weighted_entropy, confident_joint,
                                           find_label_issues, normalized_margin,
                                           out_of_fold_probs, self_confidence, stratified_folds)
from prunejax.scores.dataset import map_batches, score_dataset
from prunejax.scores.outliers import knn_distances, knn_outlier_score
from prunejax.scores.output import el2n, entropy, loss, margin
from prunejax.scores.prototypes import kmeans, prototypes
from prunejax.scores.registry import (BATCH_SCORES, HIGHER_IS_HARDER, SCORES, SELECTION_SCORES,
                                      TRACKER_SCORES, ScoreSpec)
from prunejax.types import ApplyFn, Params, Batch, Scores


def jit_score(score: str | Callable[..., Scores], apply_fn: ApplyFn,
              **kwargs: Any) -> Callable[[Params, Batch], Scores]:
  """``jax.jit`` of ``score(apply_fn, params, batch, **kwargs)`` as a function of (params, batch).

  ``apply_fn`` and ``kwargs`` are fixed; params are arguments, so a new checkpoint of the same
  shapes reuses the compiled function.
  """
  if isinstance(score, str):
    check_choice("score", score, BATCH_SCORES)
  fn = SCORES[score].fn if isinstance(score, str) else score
  return jax.jit(functools.partial(fn, apply_fn, **kwargs))
