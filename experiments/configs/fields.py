"""Every config field, declared once: its default, its type and the values it allows.

:data:`FIELDS` is the single source: :func:`defaults` builds the ConfigDict every config file starts
from (``configs/base.py``), and :func:`validate` checks a config against the same declarations
before any work starts, each error one :class:`~prunejax.errors.ConfigError` line naming the field.
A field's choices are the registries and constants that consume it (strategies, scores, mask
methods, models, cleaning steps, ...); where the library checks a value on its own (a dtype, a
sparsity, a schedule's rate, an online pruner's fractions), that check is called
(:class:`Library`); the remaining ranges, for which the library has no check of their own, are
written here, once (:class:`Range`).

What one field cannot say (a field needed when another is set, a batch that must split over the
devices) is one of the named :data:`RULES` at the end.

Adding a field is one line in :data:`FIELDS`; ``tests/test_config_fields.py`` feeds every declared
check a value it must refuse.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import ml_collections

from experiments import cleaning, similarity, strategies
from prunejax import data, masks, online, parallel, schedules, scores, select, train
from prunejax.audit import ISSUE_TYPES
from prunejax.data.text import TOKENIZERS
from prunejax.dedup import KEEP as DEDUP_KEEP
from prunejax.errors import ConfigError, check_choice, check_positive_int, check_range
from prunejax.fused import check_steps_per_dispatch
from prunejax.masks import posttraining
from prunejax.masks.unstructured import SCOPES as MASK_SCOPES
from prunejax.models import MODELS, REMAT_MODELS
from prunejax.models.precision import dtype_of

SWITCHES = ("auto", "on", "off")
"""``train.vmap_replicas`` and ``dataset.device_resident``: "auto" decides by the machine."""
CONVENTIONS = ("epochs", "steps")
"""``data_pruning.conventions``: a subset trains as many epochs as the full data, or as many steps."""

# ----------------------------------------------------------------------------------------------
# The kinds of check a field can declare.
# ----------------------------------------------------------------------------------------------


class Choices:
  """One of ``options`` (a registry: its keys are the choices)."""

  def __init__(self, options: Iterable[Any]):
    self.options = options  # read at each check: a registry may grow after import

  def __call__(self, path: str, value: Any) -> None:
    check_choice(path, value, self.options)

  bad = "no_such_choice"


@dataclasses.dataclass(frozen=True)
class Range:
  """A number in ``[lo, hi]`` (``lo_open`` / ``hi_open``: the bound itself is excluded)."""

  lo: float
  hi: float
  lo_open: bool = False
  hi_open: bool = False

  def __call__(self, path: str, value: Any) -> None:
    check_range(path, value, self.lo, self.hi, lo_open=self.lo_open, hi_open=self.hi_open)

  @property
  def bad(self) -> float:
    return self.lo if self.lo_open else self.hi if self.hi_open else self.hi + 1.0


class PositiveInt:
  """An integer > 0."""

  def __call__(self, path: str, value: Any) -> None:
    check_positive_int(path, value)

  bad = 0


@dataclasses.dataclass(frozen=True)
class Library:
  """The library's own check of this value: ``check(value)`` raises a ConfigError for a value it
  refuses, under its own name for it; the error is raised again under the config field's name.
  ``bad`` is a value it refuses (for the tests)."""

  check: Callable[[Any], Any]
  bad: Any

  def __call__(self, path: str, value: Any) -> None:
    try:
      self.check(value)
    except ConfigError as e:
      name, sep, rest = str(e).partition("=")
      raise ConfigError(f"{path}={rest}" if sep and " " not in name else f"{path}: {e}") from None


def _cv_folds(folds: Any) -> None:
  if folds and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
    raise ConfigError(f"cv_folds={folds!r} is not allowed; expected 0 (off) or an integer >= 2")


# ----------------------------------------------------------------------------------------------
# The declarations.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: ``path`` (``section.name``), its default (None: unset, then any value of
  ``type`` or None), its type (bool, int, float, str, tuple or dict; a float field takes an int),
  the ``check`` of its value (of each element when ``each``) and what it means (``doc``)."""

  path: str
  default: Any
  type: type | tuple[type, ...]
  check: Callable[[str, Any], None] | None = None
  each: bool = False
  doc: str = ""

  def validate(self, value: Any) -> None:
    """Raises a one-line ConfigError naming :attr:`path` if ``value`` is not allowed."""
    if value is None and self.default is None:
      return
    if not _is(value, self.type):
      raise ConfigError(f"{self.path}={value!r} is not allowed; expected {_describe(self.type)}")
    if self.check is not None:
      for v in (value if self.each else (value,)):
        self.check(self.path, v)


def _is(value: Any, types: type | tuple[type, ...]) -> bool:
  types = types if isinstance(types, tuple) else (types,)
  for t in types:
    if t is bool and isinstance(value, bool):
      return True
    if t in (int, float) and not isinstance(value, bool) and isinstance(
        value, numbers.Integral if t is int else numbers.Real):
      return True
    if t is tuple and isinstance(value, (tuple, list)):
      return True
    if t is dict and isinstance(value, (Mapping, ml_collections.ConfigDict)):
      return True
    if t is str and isinstance(value, str):
      return True
  return False


def _describe(types: type | tuple[type, ...]) -> str:
  names = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
           tuple: "a tuple", dict: "a dict"}
  return " or ".join(names[t] for t in (types if isinstance(types, tuple) else (types,)))


F = Field
_FRACTION_KEPT = Range(0.0, 1.0, lo_open=True)  # a share of the data kept: (0, 1]
_FRACTION_LESS_THAN_ALL = Range(0.0, 1.0, hi_open=True)  # [0, 1)
_RATE = Library(lambda v: schedules.rounds_to_reach(0.0, v), 1.0)  # a geometric schedule's rate
_TARGET_SPARSITY = Library(lambda v: schedules.rounds_to_reach(v, 0.5), 1.5)

FIELDS: tuple[Field, ...] = (
    F("name", "run", str),
    F("seed", 0, int),
    F("replicates", 2, int, PositiveInt(), doc="seeds; ignored when cv_folds > 0"),
    F("cv_folds", 0, int, Library(_cv_folds, 1),
      doc="K > 0: replicate r trains on all folds but r and also reports accuracy on fold r"),
    F("strategies", ("dense",), tuple, Choices(strategies.REGISTRY), each=True),
    # ---------------------------------------------------------------------------- dataset
    F("dataset.name", "digits", str, doc="checked by the rule dataset_known (data_dir may hold it)"),
    F("dataset.data_dir", None, str),
    F("dataset.download", False, bool),
    F("dataset.manual_dir", None, str),
    F("dataset.num_train", None, int),
    F("dataset.num_test", None, int),
    F("dataset.x_key", None, str, doc="TFDS datasets outside the catalog defaults: feature keys"),
    F("dataset.text_keys", None, tuple),
    F("dataset.label_key", None, str),
    F("dataset.train_split", None, str),
    F("dataset.test_split", None, str),
    F("dataset.image_size", None, int),
    F("dataset.tokenizer", "bpe", str, Choices(TOKENIZERS)),
    F("dataset.tokenizer_dir", None, str),
    F("dataset.vocab_size", 8192, int),
    F("dataset.max_len", 64, int),
    F("dataset.augment", False, bool, doc="images: on-device crop (after zero padding) + flip"),
    F("dataset.crop_padding", 4, int),
    F("dataset.mean", None, tuple, doc="standardization after scaling"),
    F("dataset.std", None, tuple),
    F("dataset.num_threads", None, int,
      doc="loader reader threads (default: 0 in memory, 8 on disk)"),
    F("dataset.label_noise", 0.0, float, _FRACTION_LESS_THAN_ALL,
      doc="fraction of training labels flipped (seeded), for noise experiments"),
    F("dataset.cache_dir", None, str),
    F("dataset.device_resident", "auto", str, Choices(SWITCHES),
      doc="the training split on the device (the fused path): auto when it fits device_budget_mb, "
          "on (an error if it does not fit), off (stream it from the host)"),
    F("dataset.device_budget_mb", 0.0, float, Range(0.0, 2.0**30),
      doc="0: a quarter of the device's memory, 2 GiB on CPU"),
    # ---------------------------------------------------------------------------- model
    F("model.name", "mlp", str, Choices(MODELS)),
    F("model.compute_dtype", "float32", str, Library(lambda v: dtype_of("dtype", v), "fp8"),
      doc="params and optimizer state stay param_dtype"),
    F("model.param_dtype", "float32", str, Library(lambda v: dtype_of("dtype", v), "fp8")),
    F("model.remat", False, bool,
      doc="recompute each block's activations in the backward pass (rule remat_supported)"),
    # ---------------------------------------------------------------------------- optimizer
    F("optimizer.name", "sgd", str, Choices(train.OPTIMIZERS)),
    F("optimizer.lr", 0.1, float),
    F("optimizer.momentum", 0.9, float),
    F("optimizer.nesterov", True, bool),
    F("optimizer.weight_decay", 1e-3, float),
    F("optimizer.schedule", "cosine", str, Choices(train.SCHEDULES)),
    F("optimizer.warmup_epochs", 0.0, float),
    F("optimizer.step_epochs", (), tuple),
    F("optimizer.step_factor", 0.1, float),
    F("optimizer.b1", 0.9, float),
    F("optimizer.b2", 0.999, float),
    # ---------------------------------------------------------------------------- train
    F("train.epochs", 20, int, PositiveInt()),
    F("train.batch_size", 32, int, PositiveInt(), doc="rule batch_fits"),
    F("train.eval_batch_size", 256, int),
    F("train.progress", True, bool),
    F("train.eval_every_epoch", False, bool,
      doc="test accuracy after every epoch, outside the clock: the report's time to dense "
          "accuracy (replicas then train one by one)"),
    F("train.checkpoint_every_steps", 0, int,
      doc="mid-run checkpoints (a killed run resumes at the batch where it stopped); 0 = off"),
    F("train.checkpoint_minutes", 10.0, float),
    F("train.accumulation_steps", 1, int, PositiveInt(),
      doc="micro-batches per optimizer step (batch_size rows in all); rule batch_fits"),
    F("train.loss_scale", 1.0, float, Range(0.0, 2.0**24, lo_open=True),
      doc="loss scale for float16 compute"),
    F("train.fused", True, bool,
      doc="one compiled program per run (prunejax.fused); False: the host loop, one step per "
          "dispatch"),
    F("train.steps_per_dispatch", 0, int, Library(check_steps_per_dispatch, -2),
      doc="steps per dispatch in one lax.scan (0: a whole epoch, or 1 for convolutions on CPU)"),
    F("train.vmap_replicas", "auto", str, Choices(SWITCHES),
      doc="the replicas of a setting as one vmapped program; auto: on accelerators, not on CPU"),
    # ---------------------------------------------------------------------------- data pruning
    F("data_pruning.keep_fractions", (0.3, 0.5, 0.7), tuple, _FRACTION_KEPT, each=True),
    F("data_pruning.keep", "hard", str, Choices(select.KEEPS)),
    F("data_pruning.class_balanced", False, bool),
    F("data_pruning.offset", 0.0, float),
    F("data_pruning.conventions", ("epochs",), tuple, Choices(CONVENTIONS), each=True),
    F("data_pruning.score_epochs", 3, int),
    F("data_pruning.score_seeds", 2, int, PositiveInt()),
    F("data_pruning.dynamic_keep", 0.5, float),
    F("data_pruning.tracker_epochs", 10, int),
    F("data_pruning.prototypes_k", 10, int),
    F("data_pruning.knn_k", 10, int),
    F("data_pruning.label_quality_folds", 5, int),
    F("data_pruning.label_quality_epochs", 10, int),
    F("batch_pruning.keep_fraction", 0.5, float, Library(lambda v: online.num_selected(1, v), 0.0)),
    F("batch_pruning.score", "loss", str, Choices(online.SELECTION_SCORES)),
    F("semi_batch.prune_ratio", 0.5, float, Library(lambda v: online.InfoBatch(prune_ratio=v), 1.0)),
    F("semi_batch.delta", 0.875, float, Library(lambda v: online.InfoBatch(delta=v), 1.5)),
    F("iterative.prune_per_round", 0.3, float, _RATE),
    F("iterative.target_keep", 0.3, float, Range(0.0, 1.0, lo_open=True, hi_open=True)),
    F("iterative.score", "el2n", str, Choices(scores.BATCH_SCORES)),
    F("iterative.score_epochs", 3, int),
    # ---------------------------------------------------------------------------- model pruning
    F("imp.method", "magnitude", str, Choices(masks.METHODS)),
    F("imp.prune_per_round", 0.5, float, _RATE),
    F("imp.target_sparsity", 0.9, float, _TARGET_SPARSITY),
    F("imp.scope", "global", str, Choices(MASK_SCOPES)),
    F("imp.rewind_step", 0, int),
    F("imp.reset_optimizer", True, bool, doc="rule imp_rewinds"),
    F("imp.max_rounds", None, int, doc="rule imp_reachable"),
    F("imp.prune_head", True, bool),
    F("pai.methods", ("magnitude", "random", "snip", "grasp", "synflow"), tuple,
      Choices(masks.METHODS), each=True),
    F("pai.sparsities", (0.5, 0.8, 0.9), tuple, _FRACTION_LESS_THAN_ALL, each=True),
    F("joint.data", "semi_batch", str, Choices(strategies.ONLINE_PRUNERS)),
    # ---------------------------------------------------------------------------- RHO-LOSS
    F("rho_loss.holdout_fraction", 0.0, float, _FRACTION_LESS_THAN_ALL,
      doc="the irreducible-loss model's holdout; 0: two cross-fitted halves instead"),
    F("rho_loss.epochs", 3, int, PositiveInt()),
    F("rho_loss.model", {}, dict, doc="overrides of the config's model, e.g. a smaller width"),
    # ---------------------------------------------------------------------------- deduplication
    F("dedup.first", "off", str, Choices(cleaning.FIRST_STEPS),
      doc="a cleaning step before any strategy (experiments/cleaning.py)"),
    F("dedup.eps", 0.05, float, Range(0.0, 1.0), doc="SemDeDup's eps (the semdedup strategy "
                                                    "sets it per keep fraction)"),
    F("dedup.num_clusters", 50, int, PositiveInt()),
    F("dedup.keep", "farthest", str, Choices(DEDUP_KEEP)),
    F("dedup.audit_remove", ("label", "exact_duplicate", "near_duplicate", "leakage"), tuple,
      Choices(ISSUE_TYPES), each=True, doc="first='audit': the flagged types that go"),
    F("dedup.audit_max_removed", 0.5, float, Range(0.0, 1.0)),
    # ---------------------------------------------------------------------------- post-training
    F("post_training.methods", ("magnitude", "wanda", "sparsegpt"), tuple,
      Choices(strategies.POST_TRAINING_METHODS), each=True),
    F("post_training.sparsities", (0.5, 0.6, 0.7, "2:4"), tuple,
      Library(posttraining._rule, "3:2"), each=True, doc="a fraction or 'N:M' (keep N of M)"),
    F("post_training.calibration", ("random", "el2n_hard", "el2n_easy"), tuple,
      Choices(strategies.CALIBRATION_SETS), each=True),
    F("post_training.calibration_size", 128, int, PositiveInt()),
    F("post_training.error_size", 256, int, PositiveInt()),
    F("post_training.batch_size", 64, int, PositiveInt()),
    F("post_training.wanda_scope", "row", str, Choices(posttraining.SCOPES)),
    F("post_training.sparsegpt_scope", "layerwise", str, Choices(posttraining.SCOPES)),
    F("post_training.sequential", "group", (bool, str),
      Choices((True, False) + posttraining.ORDERS),
      doc="group (input group by input group), block (block by block) or False (every layer on "
          "the dense model), see prunejax.masks.posttraining"),
    F("post_training.blocksize", 128, int, PositiveInt()),
    F("post_training.damp", 0.01, float),
    F("post_training.prune_head", False, bool),
)
"""Every field of ``configs/base.py``, in the order of the ConfigDict it builds."""

OPEN_SECTIONS = ("", "model")
"""Sections that may hold fields beyond the declared ones: top-level extras of one config file
(``validation_fraction``, ``less``: :func:`experiments.similarity.check_config`) and the model's
constructor arguments (``width_multiplier``, ``depth``, ``checkpoint_dir``, ...), which
:func:`prunejax.models.build_model` checks."""


# ----------------------------------------------------------------------------------------------
# Rules across fields.
# ----------------------------------------------------------------------------------------------


def dataset_known(config: ml_collections.ConfigDict) -> None:
  """``dataset.name`` is embedded, registered, a TFDS name, or prepared in ``dataset.data_dir``."""
  data.check_dataset_name(config.dataset.name, config.dataset.get("data_dir"), "dataset.name")


def strategies_given(config: ml_collections.ConfigDict) -> None:
  if not config.strategies:
    raise ConfigError("strategies=() is empty; choose at least one of: "
                      + ", ".join(strategies.REGISTRY))


def checkpoint_given(config: ml_collections.ConfigDict) -> None:
  """A config that fine-tunes a pretrained model (``model.require_checkpoint``) names it."""
  if config.model.get("require_checkpoint") and not config.model.get("checkpoint_dir"):
    raise ConfigError("model.checkpoint_dir is not set; this config fine-tunes a pretrained GPT-2: "
                      "download one (e.g. huggingface-cli download openai-community/gpt2 "
                      "--local-dir DIR) and pass --config.model.checkpoint_dir=DIR")


def remat_supported(config: ml_collections.ConfigDict) -> None:
  if config.model.get("remat", False) and config.model.name not in REMAT_MODELS:
    raise ConfigError(f"model.remat=True is not supported by model {config.model.name!r}; "
                      f"rematerialization is per block of: {', '.join(map(repr, REMAT_MODELS))}")


def batch_fits(config: ml_collections.ConfigDict) -> None:
  """``train.accumulation_steps`` divides ``train.batch_size``, and the batch and each micro-batch
  split evenly over the devices."""
  steps = config.train.get("accumulation_steps", 1)
  if config.train.batch_size % steps:
    raise ConfigError(f"train.accumulation_steps={steps} must divide train.batch_size="
                      f"{config.train.batch_size} (each micro-batch has batch_size / "
                      "accumulation_steps rows)")
  mesh = parallel.data_mesh()
  parallel.check_batch_size(config.train.batch_size // steps, mesh,
                            "train.batch_size / train.accumulation_steps")
  parallel.check_batch_size(config.train.batch_size, mesh, "train.batch_size")


def imp_rewinds(config: ml_collections.ConfigDict) -> None:
  imp = config.imp
  if not imp.rewind_step and not imp.get("reset_optimizer", True):
    raise ConfigError("imp.reset_optimizer=False does nothing with imp.rewind_step=0: the "
                      "optimizer state at step 0 is a fresh one; set imp.rewind_step > 0 to keep "
                      "the optimizer state of that step, or leave imp.reset_optimizer=True")


def imp_reachable(config: ml_collections.ConfigDict) -> None:
  """``imp.max_rounds`` (when set) reaches ``imp.target_sparsity`` at ``imp.prune_per_round``."""
  imp = config.imp
  if imp.get("max_rounds") is None:
    return
  need = schedules.rounds_to_reach(imp.target_sparsity, imp.prune_per_round)
  if need > imp.max_rounds:
    raise ConfigError(f"imp.max_rounds={imp.max_rounds} cannot reach imp.target_sparsity="
                      f"{imp.target_sparsity} at imp.prune_per_round={imp.prune_per_round} "
                      f"(needs {need} rounds)")


RULES: tuple[Callable[[ml_collections.ConfigDict], None], ...] = (
    dataset_known, strategies_given, checkpoint_given, remat_supported, batch_fits, imp_rewinds,
    imp_reachable, similarity.check_config)
"""The checks across fields, run after every field's own (``similarity.check_config``: the
``less`` section and ``validation_fraction`` of the LESS strategies)."""

# ----------------------------------------------------------------------------------------------
# Defaults and validation, both read from FIELDS.
# ----------------------------------------------------------------------------------------------


def defaults() -> ml_collections.ConfigDict:
  """The ConfigDict of every declared field at its default (an unset field is a typed None)."""
  config = ml_collections.ConfigDict()
  for field in FIELDS:
    *sections, leaf = field.path.split(".")
    node = config
    for s in sections:
      if s not in node:
        node[s] = ml_collections.ConfigDict()
      node = node[s]
    node[leaf] = (ml_collections.FieldReference(None, field_type=field.type)
                  if field.default is None else field.default)
  return config


_MISSING = object()
_BY_PATH = {f.path: f for f in FIELDS}


def _lookup(config: Any, path: str) -> Any:
  node = config
  for key in path.split("."):
    if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or key not in node:
      return _MISSING
    node = node[key]
  return node


def _refuse_unknown(config: ml_collections.ConfigDict) -> None:
  """A field of a declared section that is not declared (``train.lr_schedul``) is refused."""
  sections = sorted({f.path.rsplit(".", 1)[0] for f in FIELDS if "." in f.path})
  for section in sections:
    node = _lookup(config, section)
    if section in OPEN_SECTIONS or not isinstance(node, (Mapping, ml_collections.ConfigDict)):
      continue
    for key in node.keys():
      if f"{section}.{key}" not in _BY_PATH:
        known = ", ".join(f.path.rsplit(".", 1)[1] for f in FIELDS
                          if f.path.startswith(section + "."))
        raise ConfigError(f"{section}.{key} is not a config field; {section} has: {known}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field that can be checked before any work starts: each declared field's type
  and allowed values (a section a config leaves out is not checked), no undeclared field in a
  declared section, then :data:`RULES`.

  Raises:
    ConfigError: one line naming the field and what it allows.
  """
  for field in FIELDS:
    value = _lookup(config, field.path)
    if value is not _MISSING:
      field.validate(value)
  _refuse_unknown(config)
  for rule in RULES:
    rule(config)
