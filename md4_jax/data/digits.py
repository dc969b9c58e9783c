"""scikit-learn's bundled 8x8 digits: 1797 images, no download needed.

Pixels take the 17 intensity values 0..16, so an image is (8, 8, 1) tokens of
a vocabulary of 17; labels are the digits 0..9. The split is fixed and
independent of `config.seed`: a permutation drawn with
`np.random.default_rng(0)`, then the first 1497 examples train and the last
300 evaluate (`config.eval_split='train'` evaluates on the 1497 instead).
"""

import numpy as np

from md4_jax.data import common

NAME = "digits"
DATA_SHAPE = (8, 8, 1)
VOCAB_SIZE = 17
NUM_CLASSES = 10
NUM_TRAIN = 1497  # The remaining 300 of 1797 are the evaluation split.
SPLITS = ("train", "test")


def load_split(split: str) -> common.ArraySource:
  """Returns the 'train' (1497) or 'test' (300) split.

  Args:
    split: 'train' or 'test'.

  Returns:
    Records `{'x': int64 [8, 8, 1] in [0, 16], 'label': int64 []}`.
  """
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top  # Slow to import.
  if split not in SPLITS:
    raise ValueError(f"Dataset {NAME!r} has no split {split!r}; valid: {', '.join(SPLITS)}.")
  digits = sk_datasets.load_digits()
  x_Nx8x8x1 = digits.images.astype(np.int64).reshape(-1, *DATA_SHAPE)
  order = np.random.default_rng(0).permutation(len(x_Nx8x8x1))
  rows = {"train": order[:NUM_TRAIN], "test": order[NUM_TRAIN:]}[split]
  return common.ArraySource(x_Nx8x8x1[rows], digits.target[rows])


def open_sources(config, split: str) -> common.Sources:
  """The train split and `split` (see `DatasetInfo.open_sources`)."""
  transform = common.ToTokens("x", "label" if config.classes else None)
  return common.Sources(load_split("train"), load_split(split), transform)


INFO = common.DatasetInfo(
    name=NAME,
    kind="image",
    vocab_size=VOCAB_SIZE,
    metric="bits_per_dim",
    eval_split="test",
    splits=SPLITS,
    data_shape=DATA_SHAPE,
    classes=NUM_CLASSES,
    default_data_dir="",
    prepare="nothing to prepare: bundled with scikit-learn",
    open_sources=open_sources,
)
