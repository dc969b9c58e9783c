"""Input pipelines and the dataset registry.

Each dataset family lives in its own module and declares one
`common.DatasetInfo` record per dataset (shape, vocabulary, classes, kind,
headline metric, text codec, data dir, splits, how to prepare it):

* digits: scikit-learn's 8x8 digits (bundled, no download).
* cifar10, imagenet64: TFDS ArrayRecord via `tfds.data_source` (images.py).
* text8: characters of the text8 file (text8.py).
* openwebtext, fineweb_edu: GPT-2 token shards from `prepare` (tokenized.py).
* lambada, wikitext2, wikitext103, ptb, lm1b: GPT-2's zero-shot evaluation
  sets, packed GPT-2 blocks from `prepare` (zero_shot.py; evaluation only).
* synthetic_text: sequences of a seeded Markov source with exact
  probabilities (synthetic.py; generated, no download).

Code outside `data/` reads dataset facts with `get_info(config.dataset)`.
"""

from md4_jax.data import common
from md4_jax.data import digits
from md4_jax.data import images
from md4_jax.data import synthetic
from md4_jax.data import text8
from md4_jax.data import tokenized
from md4_jax.data import zero_shot

Datasets = common.Datasets
DatasetInfo = common.DatasetInfo

DATASETS: dict[str, DatasetInfo] = {
    digits.NAME: digits.INFO,
    **images.INFOS,
    text8.NAME: text8.INFO,
    **tokenized.INFOS,
    **zero_shot.INFOS,
    synthetic.NAME: synthetic.INFO,
}


def get_info(name: str) -> DatasetInfo:
  """The record of dataset `name`; ValueError lists the valid names."""
  try:
    return DATASETS[name]
  except KeyError:
    raise ValueError(
        f"Unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}."
    ) from None


def create_datasets(config, process_index=None, process_count=None) -> Datasets:
  """Builds the training iterator and evaluation batches for `config.dataset`.

  Args:
    config: The run config; reads `dataset`, `data_dir`, `data_shape`,
      `vocab_size`, `classes`, `batch_size`, `eval_batch_size`, `seed`,
      `random_flip`, `grain_worker_count`, `grain_prefetch` and `eval_split`
      ('' = the dataset's held-out split, `DatasetInfo.eval_split`).
    process_index: This process; None means `jax.process_index()`.
    process_count: Number of processes; None means `jax.process_count()`.

  Returns:
    A `Datasets` bundle for this process (see `common.Datasets`).

  Raises:
    ValueError: For an unknown dataset, a config that does not match the data,
      or a batch size that does not divide by the process count.
    FileNotFoundError: If the dataset's files are not prepared.
  """
  return common.make_datasets(get_info(config.dataset), config, process_index, process_count)
