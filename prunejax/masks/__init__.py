"""Model pruning masks: pure functions from parameter pytrees to bool masks of the same structure.

* :mod:`~prunejax.masks.core`: :func:`threshold_mask` (exact, sort-free), applying and measuring
  masks; it re-exports :mod:`~prunejax.masks.filters` (key paths, ``filter_fn`` filters) and
  :mod:`~prunejax.masks.sharding` (explicit mesh axes, ``shard_map``).
* :mod:`~prunejax.masks.unstructured`: magnitude, random, SNIP, GraSP, SynFlow, movement.
* :mod:`~prunejax.masks.distributions`: uniform, ERK and custom per-layer sparsities.
* :mod:`~prunejax.masks.structured`: neurons, channels, heads, N:M, in any kernel layout
  (:mod:`~prunejax.masks.layouts`).
* :mod:`~prunejax.masks.compact`: structured-pruned models rebuilt smaller.
* :mod:`~prunejax.masks.lottery`: rewind points for lottery-ticket experiments.
* :mod:`~prunejax.masks.masked_state`: the mask inside an optimizer state (for
  :mod:`prunejax.optim`).
* :mod:`~prunejax.masks.posttraining`: Wanda and SparseGPT from a calibration set, no retraining
  (:mod:`~prunejax.masks.wanda`, :mod:`~prunejax.masks.sparsegpt`, their calibration statistics in
  :mod:`~prunejax.masks.calibration`, layers and stages in :mod:`~prunejax.masks.pt_layers`, the
  shared driver in :mod:`~prunejax.masks.pt_driver`).
* :mod:`~prunejax.masks.methods`: :data:`METHODS`, the registry of mask methods under one contract.
"""

from prunejax.masks.compact import compact
from prunejax.masks.core import (EMBEDDING_NAME, POSITION_NAME, PRUNABLE_NAMES, WEIGHT_NAME,
                                 apply_mask, check_mask, count_params, default_filter_fn,
                                 leaf_paths, make_filter_fn, ones_mask, path_str, resolve_filter,
                                 sparsity_of, threshold_mask)
from prunejax.masks.distributions import custom, erk, uniform
from prunejax.masks.methods import METHODS, MaskInputs, MaskMethod
from prunejax.masks.posttraining import (Calibration, LayerStats, LinearLayer, calibrate,
                                         calibration_nbytes, layer_errors, linear_filter_fn,
                                         linear_layers, obs_prune, sparsegpt, sparsegpt_scores,
                                         wanda, wanda_scores)
from prunejax.masks.lottery import RewindPoint, rewind, rewind_state, save_rewind_point
from prunejax.masks.structured import (ATTENTION_NAMES, LAYOUTS, channels, heads, leaf_layout, n_m,
                                       neurons, structured_filter_fn)
from prunejax.masks.unstructured import (grasp, grasp_scores, magnitude, mask_from_scores,
                                         mean_cross_entropy, movement, movement_scores,
                                         prune_counts, random, snip, snip_scores, synflow,
                                         synflow_scores)
