"""Datasets as in-memory uint8 arrays, the stratified 70/10/20 split, jitted batch transforms (docs/data.md).

    dataset.py    Dataset, load_dataset: decode (or read the cache), then split by seed
    sources.py    digits, image folders, TFDS; decode_file for one image file
    cache.py      the decoded arrays as one .npz per source and preprocessing
    split.py      the per-class subset, the stratified, seeded split, stratified_folds of the training set
    batching.py   normalize, augment (jittable), batch_indices, make_global_batch, gather_batch
    stream.py     streamed input with grain (folders, TFDS array_record), never held whole (docs/scale.md)
    logits_store.py  teacher logits on disk, one row per example, read by memory map
    transforms.py the ImageNet transforms: random-resized crop + flip, resize + center crop
"""

from debkd_jax.data.batching import augment, batch_indices, gather_batch, make_global_batch, normalize
from debkd_jax.data.dataset import Dataset, load_dataset
from debkd_jax.data.sources import DIGITS_CLASS_NAMES, IMAGE_EXTENSIONS, SOURCE_FORMS, decode_file
from debkd_jax.data.split import stratified_folds

__all__ = [
    "DIGITS_CLASS_NAMES",
    "IMAGE_EXTENSIONS",
    "SOURCE_FORMS",
    "Dataset",
    "augment",
    "batch_indices",
    "decode_file",
    "load_dataset",
    "gather_batch",
    "make_global_batch",
    "normalize",
    "stratified_folds",
]
