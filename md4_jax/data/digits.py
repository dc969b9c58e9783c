"""scikit-learn's bundled 8x8 digits: 1797 images, no download needed.

Pixels take the 17 intensity values 0..16, so an image is (8, 8, 1) tokens of
a vocabulary of 17; labels are the digits 0..9. The split is fixed and
independent of `config.seed`: a permutation drawn with
`np.random.default_rng(0)`, then the first 1497 examples train and the last
300 evaluate (`config.eval_split='train'` evaluates on the 1497 instead).
"""

import numpy as np
from sklearn import datasets as sk_datasets

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
  if split not in SPLITS:
    raise ValueError(f"Dataset {NAME!r} has no split {split!r}; valid: {', '.join(SPLITS)}.")
  digits = sk_datasets.load_digits()
  x_Nx8x8x1 = digits.images.astype(np.int64).reshape(-1, *DATA_SHAPE)
  order = np.random.default_rng(0).permutation(len(x_Nx8x8x1))
  rows = {"train": order[:NUM_TRAIN], "test": order[NUM_TRAIN:]}[split]
  return common.ArraySource(x_Nx8x8x1[rows], digits.target[rows])


def build(config, process_index=None, process_count=None) -> common.Datasets:
  """Builds the digits pipelines (see `md4_jax.data.create_datasets`)."""
  common.check_config(
      config,
      NAME,
      vocab_size=VOCAB_SIZE,
      data_shape=DATA_SHAPE,
      classes=NUM_CLASSES,
  )
  options = common.pipeline_options(config, process_index, process_count)
  transform = common.ToTokens("x", "label" if config.classes else None)
  split = common.eval_split(config, NAME, "test", SPLITS)
  eval_source = load_split(split)
  return common.Datasets(
      train_iter=common.train_iterator(
          load_split("train"), transform, options, flip=config.random_flip
      ),
      eval_batches=common.eval_batches_fn(eval_source, transform, options),
      num_eval_examples=len(eval_source),
      kind="image",
      eval_split=split,
  )
