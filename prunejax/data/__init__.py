"""Data: id-keyed random-access sources, the grain loader, on-device preprocessing, text tokenization.

* :mod:`~prunejax.data.sources`: :class:`Source` and its kinds (in-memory arrays, any random-access
  records such as a TFDS data source, prunejax's array_record files).
* :mod:`~prunejax.data.loader`: :func:`batches`, padded batches of any subset of ids, per process.
* :mod:`~prunejax.data.augment`: :class:`Preprocess`, normalization and crop + flip on device.
* :mod:`~prunejax.data.datasets`: datasets by name (embedded, TFDS, registered).
* :mod:`~prunejax.data.ids`: :class:`IdIndex`, the one id -> row lookup.
* :mod:`~prunejax.data.noise`: :func:`flip_labels`, seeded label noise recorded by id.
"""

from prunejax.data.augment import Preprocess, augment, crop_flip_params, example_keys
from prunejax.data.datasets import (EMBEDDED, TFDS_DATASETS, Dataset, TFDSLayout,
                                    check_dataset_name, known_dataset, load_dataset, load_digits,
                                    load_mnist5k, load_rotten_tomatoes, load_tfds,
                                    read_rotten_tomatoes, register_dataset)
from prunejax.data.ids import IdIndex
from prunejax.data.loader import (PAD_ID, batches, epoch_order, num_batches, prefetch,
                                  tune_malloc)
from prunejax.data.noise import flip_labels
from prunejax.data.sources import (ArrayRecordSource, ArraySource, RecordSource, RelabeledSource,
                                   Source, SubsetSource, write_array_record)
