"""Data sources of two kinds behind one interface, the stratified 70/10/20 split, jitted batch transforms
(docs/data.md).

    source.py     DataSource, Split: a source's splits as decoded arrays ("memory") or image files ("files");
                  the run's training batches and an evaluation pass's batches, one iterator interface for both

    dataset.py    Dataset, load_dataset: decode (or read the cache), then split by seed
    sources.py    digits, image folders, TFDS; decode_file for one image file
    cache.py      the decoded arrays as one .npz per source and preprocessing
    split.py      the per-class subset, the stratified, seeded split, stratified_folds of the training set
    batching.py   normalize, augment (jittable), batch_indices, make_global_batch, gather_batch
    stream.py     the files kind: folders and TFDS array_record listed, then read by grain (docs/scale.md)
    logits_store.py  teacher logits, one row per example: in memory, on disk by memory map, or composed
    transforms.py the ImageNet transforms: random-resized crop + flip, resize + center crop
"""

from debkd_jax.data import views
from debkd_jax.data.batching import PAD, augment, batch_indices, gather_batch, make_global_batch, normalize
from debkd_jax.data.dataset import Dataset, load_dataset
from debkd_jax.data.source import NORMALIZATION, DataSource, Split, files_source, memory_source
from debkd_jax.data.sources import DIGITS_CLASS_NAMES, IMAGE_EXTENSIONS, SOURCE_FORMS, decode_file
from debkd_jax.data.split import stratified_folds
from debkd_jax.data.transforms import read_image_file

__all__ = [
    "DIGITS_CLASS_NAMES",
    "PAD",
    "IMAGE_EXTENSIONS",
    "NORMALIZATION",
    "SOURCE_FORMS",
    "DataSource",
    "Dataset",
    "Split",
    "augment",
    "batch_indices",
    "decode_file",
    "files_source",
    "memory_source",
    "load_dataset",
    "gather_batch",
    "make_global_batch",
    "normalize",
    "read_image_file",
    "stratified_folds",
    "views",
]
