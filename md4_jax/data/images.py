"""TFDS image datasets read as ArrayRecord through `tfds.data_source` + grain.

uint8 pixels become int32 tokens of a vocabulary of 256; examples are
(H, W, 3). The data must be prepared once as ArrayRecord, on a machine with
internet, e.g.

  tfds build cifar10 --data_dir=DIR --file_format=array_record

then `config.data_dir = DIR` ('' = TFDS's default data_dir, usually
~/tensorflow_datasets or $TFDS_DATA_DIR). TFDS is imported when a split is
opened, so the records load without it.
"""

import dataclasses
import functools

from md4_jax.data import common

VOCAB_SIZE = 256


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """A TFDS image dataset.

  Attributes:
    tfds_name: Name passed to `tfds.data_source`.
    data_shape: (H, W, C) of one image.
    classes: Number of labels (0 = the TFDS dataset has none).
    train_split: TFDS split used for training.
    eval_split: TFDS split used for evaluation unless `config.eval_split`
      names another (any TFDS split or slice, e.g. 'train[:10000]').
  """

  tfds_name: str
  data_shape: tuple[int, int, int]
  classes: int
  train_split: str = "train"
  eval_split: str = "test"


DATASETS = {
    "cifar10": ImageDataset("cifar10", (32, 32, 3), classes=10),
    "imagenet64": ImageDataset(
        "downsampled_imagenet/64x64",
        (64, 64, 3),
        classes=0,
        eval_split="validation",
    ),
}


def prepare_command(tfds_name: str, data_dir: str = "DIR") -> str:
  return f"tfds build {tfds_name} --data_dir={data_dir} --file_format=array_record"


def data_source(tfds_name: str, split: str, data_dir: str | None):
  """Opens one split of a prepared ArrayRecord TFDS dataset.

  Args:
    tfds_name: TFDS dataset name, e.g. 'cifar10'.
    split: TFDS split name.
    data_dir: TFDS data_dir; None means TFDS's default.

  Returns:
    A random-access source of decoded examples (dicts of numpy arrays).

  Raises:
    FileNotFoundError: If the dataset is not prepared as ArrayRecord there.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(
        tfds_name, split=split, data_dir=data_dir, download=False
    )
  except Exception:  # TFDS raises several types; diagnose below.
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    prepared = builder.is_prepared() and (
        builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    )
    if prepared:
      raise
  root = data_dir or tfds.core.constants.DATA_DIR
  raise FileNotFoundError(
      f"Dataset {tfds_name!r} is not prepared as ArrayRecord under "
      f"data_dir={root!r} (looked in {builder.data_dir}). Prepare it on a "
      f"machine with internet:\n  {prepare_command(tfds_name, root)}\nand "
      "point config.data_dir at that directory."
  )


def open_sources(config, split: str, *, dataset: ImageDataset) -> common.Sources:
  """The TFDS train split and `split` (see `DatasetInfo.open_sources`)."""
  data_dir = config.data_dir or None
  transform = common.ToTokens(
      "image", "label" if config.classes else None, dataset.data_shape
  )
  return common.Sources(
      data_source(dataset.tfds_name, dataset.train_split, data_dir),
      data_source(dataset.tfds_name, split, data_dir),
      transform,
  )


INFOS = {
    name: common.DatasetInfo(
        name=name,
        kind="image",
        vocab_size=VOCAB_SIZE,
        metric="bits_per_dim",
        eval_split=dataset.eval_split,
        splits=None,  # Any TFDS split or slice, e.g. 'train[:10000]'.
        data_shape=dataset.data_shape,
        classes=dataset.classes,
        default_data_dir="",  # TFDS's own default data_dir.
        prepare=prepare_command(dataset.tfds_name),
        open_sources=functools.partial(open_sources, dataset=dataset),
    )
    for name, dataset in DATASETS.items()
}
