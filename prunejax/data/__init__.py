"""Datasets with stable example ids, batching with padding masks, and text tokenization."""

from prunejax.data.datasets import (ALL_DATASETS, EMBEDDED, TEXT_DATASETS, TFDS_DATASETS, Dataset,
                                    Split, load_dataset, load_digits, load_mnist5k,
                                    load_rotten_tomatoes, load_tfds, read_rotten_tomatoes)
from prunejax.data.pipeline import (PAD_ID, augment_by_id, augment_images, batches, epoch_order, make_batch,
                                    num_batches, prefetch)
from prunejax.data.noise import flip_labels
