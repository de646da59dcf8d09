"""Slices of a text dataset by the words they contain: the target of targeted selection
(``less_targeted``) and the slice accuracy every result row reports when ``less.slice_words`` is
set (:func:`slice_accuracy`, called by ``experiments/trainer.result_row``).

Below the trainer: it imports nothing from the rest of ``experiments``.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from prunejax import train
from prunejax.errors import ConfigError

NEGATION_WORDS = ("not", "no", "never", "n't", "nothing", "none", "nobody", "neither", "nor",
                  "without")


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_texts() -> tuple[str, ...]:
  from prunejax.data import read_rotten_tomatoes
  return tuple(read_rotten_tomatoes()[0])


def slice_ids(ctx, ids: np.ndarray, words) -> np.ndarray:
  """The ids (of either split: Rotten Tomatoes ids are rows of one file) whose text contains one
  of ``words`` as a word, case-insensitively (``n't`` also as a suffix: "isn't", with a straight
  or a curly apostrophe)."""
  if ctx.config.dataset.name != "rotten_tomatoes":
    raise ConfigError(f"less.slice_words needs the texts; only dataset rotten_tomatoes keeps them, "
                      f"not {ctx.config.dataset.name!r}")
  texts = _rotten_tomatoes_texts()
  alts = "|".join(re.escape(w) for w in words if w != "n't")
  pattern = re.compile(r"\b(?:" + alts + r")\b" + ("|n't\\b" if "n't" in words else ""),
                       re.IGNORECASE)
  ids = np.asarray(ids, np.int64)
  found = [bool(pattern.search(texts[i].replace("\u2019", "'"))) for i in ids]
  return ids[np.array(found, bool)]


def slice_accuracy(ctx, state) -> float | None:
  """Test accuracy on the slice ``less.slice_words`` (None when the config has no slice)."""
  lc = ctx.config.get("less")
  if lc is None or not lc.get("slice_words"):
    return None
  ids = slice_ids(ctx, ctx.ds.test.ids, tuple(lc.slice_words))
  if not len(ids):
    return None
  return train.evaluate(state, ctx.batches(np.sort(ids), split="test"), ctx.mesh)["accuracy"]
