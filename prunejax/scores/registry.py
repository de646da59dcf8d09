"""The registry of example scores: the single source of truth for what each score is, which way is
hard, and what it costs.

A :class:`ScoreSpec` carries everything the rest of the code needs: the per-batch function
(``fn(apply_fn, params, batch) -> f32[B]``) or the tracker that follows the score over training, its
direction, and its cost in example passes (forward 1, backward 2) per scored example and scoring
pass. Experiment scripts, config validation and the generic tests read :data:`SCORES`; adding a score
is its module plus one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from prunejax.scores.dynamics import Tracker, aum, cartography, forgetting
from prunejax.scores.grand import grand, grand_last_layer
from prunejax.scores.influence import less, tracin
from prunejax.scores.output import check_batch, el2n, entropy, loss, margin
from prunejax.scores.uncertainty import least_confidence


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
  """A registered example score.

  Attributes:
    name: the name configs use.
    higher_is_harder: direction; :mod:`prunejax.select` wants high = hard (see :meth:`hardness`).
    passes: example passes to score one example once (EL2N 1: a forward; GraNd 3: a forward and a
      backward).
    fn: a per-batch score ``fn(apply_fn, params, batch) -> f32[B]`` (0 on padding rows), or None.
    tracker: for scores read off training dynamics, a factory of the :class:`Tracker` that follows
      them (``update(state, batch, logits)`` once per presentation), or None.
    read: the tracker's read-out for this score when it is not ``Tracker.read``.
    description: one line for listings.
    selection: for selections by similarity to a target (TracIn, LESS), the function that scores
      the examples from gradients or gradient features and the target's (see
      :mod:`prunejax.scores.influence`); high means most influential, i.e. keep ``"hard"``.
  """

  name: str
  higher_is_harder: bool
  passes: float = 1.0
  fn: Callable[..., Any] | None = None
  tracker: Callable[[], Tracker] | None = None
  read: Callable[[Any], Any] | None = None
  description: str = ""
  selection: Callable[..., Any] | None = None

  @property
  def kind(self) -> str:
    """``"batch"`` (a function of one batch), ``"tracker"`` (over training), ``"selection"``
    (similarity to a target set's gradients) or ``"dataset"`` (needs the whole dataset:
    embeddings, cross-validated probabilities)."""
    if self.fn is not None:
      return "batch"
    if self.tracker is not None:
      return "tracker"
    return "selection" if self.selection is not None else "dataset"

  def __call__(self, apply_fn, params, batch, **kwargs):
    if self.fn is None:
      raise TypeError(f"score {self.name!r} is not a per-batch score (kind {self.kind!r})")
    if check_batch(batch) == 0:  # nothing to score (and nothing to trace layers on)
      return jnp.zeros((0,), jnp.float32)
    return self.fn(apply_fn, params, batch, **kwargs)

  def hardness(self, scores: Any) -> np.ndarray:
    """``scores`` oriented so that high means hard."""
    scores = np.asarray(scores)
    return scores if self.higher_is_harder else -scores

  def read_tracker(self, state: Any) -> Any:
    read = self.read or self.tracker().read
    return read(state)


def _specs(*specs: ScoreSpec) -> dict[str, ScoreSpec]:
  return {s.name: s for s in specs}


SCORES: dict[str, ScoreSpec] = _specs(
    ScoreSpec("el2n", True, 1.0, fn=el2n, description="norm of softmax error (Paul et al. 2021)"),
    ScoreSpec("loss", True, 1.0, fn=loss, description="cross-entropy"),
    ScoreSpec("margin", False, 1.0, fn=margin, description="label logit minus the largest other"),
    ScoreSpec("entropy", True, 1.0, fn=entropy, description="predictive entropy"),
    ScoreSpec("least_confidence", True, 1.0, fn=least_confidence,
              description="1 - max softmax probability (Coleman et al. 2020)"),
    ScoreSpec("grand", True, 3.0, fn=grand, description="exact per-example gradient norm"),
    ScoreSpec("grand_last_layer", True, 1.0, fn=grand_last_layer,
              description="gradient norm of a linear head, closed form"),
    ScoreSpec("tracin", True, 3.0, selection=tracin,
              description="lr-weighted <grad, target grad> (or self-influence) over checkpoints "
                          "(Pruthi et al. 2020)"),
    ScoreSpec("less", True, 3.0, selection=less,
              description="max or mean cosine of projected Adam gradients to target gradients "
                          "(Xia et al. 2024)"),
    ScoreSpec("forgetting", True, 1.0, tracker=forgetting,
              description="forgetting events over training (Toneva et al. 2019)"),
    ScoreSpec("aum", False, 1.0, tracker=aum, description="area under the margin (Pleiss 2020)"),
    ScoreSpec("confidence", False, 1.0, tracker=cartography,
              description="mean p(y|x) over training (dataset cartography)"),
    ScoreSpec("variability", True, 1.0, tracker=cartography,
              read=lambda state: state.variability(),
              description="std of p(y|x) over training (dataset cartography)"),
    ScoreSpec("prototypes", True, 1.0,
              description="distance to the nearest k-means centroid of embeddings"),
    ScoreSpec("knn_outlier", True, 1.0,
              description="k-nearest-neighbour outlier score of embeddings (cleanlab Datalab)"),
    ScoreSpec("self_confidence", False, 1.0,
              description="out-of-fold p(label) (Confident Learning)"),
    ScoreSpec("normalized_margin", False, 1.0,
              description="out-of-fold normalized margin (Confident Learning)"),
)
"""Every registered score by name."""

BATCH_SCORES = tuple(name for name, s in SCORES.items() if s.kind == "batch")
TRACKER_SCORES = tuple(name for name, s in SCORES.items() if s.kind == "tracker")
SELECTION_SCORES = tuple(name for name, s in SCORES.items() if s.kind == "selection")

HIGHER_IS_HARDER: dict[str, bool] = {name: s.higher_is_harder for name, s in SCORES.items()}
"""Each score's direction, derived from :data:`SCORES`."""
