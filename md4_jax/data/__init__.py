"""Input pipelines: `create_datasets(config)` → per-process grain iterators.

Each dataset family lives in its own module and contributes builders
`build(config, process_index, process_count) -> Datasets` to `DATASETS`:

* digits: scikit-learn's 8x8 digits (bundled, no download).
* cifar10, imagenet64: TFDS ArrayRecord via `tfds.data_source` (images.py).
* text8: characters of the text8 file (text8.py).
* openwebtext, fineweb_edu: GPT-2 token shards from `prepare` (tokenized.py).
"""

from md4_jax.data import common
from md4_jax.data import digits
from md4_jax.data import images
from md4_jax.data import text8
from md4_jax.data import tokenized

Datasets = common.Datasets

DATASETS = {
    digits.NAME: digits.build,
    **images.BUILDERS,
    text8.NAME: text8.build,
    **tokenized.BUILDERS,
}


def create_datasets(config, process_index=None, process_count=None) -> Datasets:
  """Builds the training iterator and evaluation batches for `config.dataset`.

  Args:
    config: The run config; reads `dataset`, `data_dir`, `data_shape`,
      `vocab_size`, `classes`, `batch_size`, `eval_batch_size`, `seed`,
      `random_flip`, `grain_worker_count`, `grain_prefetch`, and
      `eval_split` if present ('' or absent = the dataset's held-out split:
      digits 'test', text8 'validation', cifar10 'test', imagenet64
      'validation', openwebtext / fineweb_edu 'validation').
    process_index: This process; None means `jax.process_index()`.
    process_count: Number of processes; None means `jax.process_count()`.

  Returns:
    A `Datasets` bundle for this process (see `common.Datasets`).

  Raises:
    ValueError: For an unknown dataset, a config that does not match the data,
      or a batch size that does not divide by the process count.
    FileNotFoundError: If the dataset's files are not prepared.
  """
  try:
    builder = DATASETS[config.dataset]
  except KeyError:
    raise ValueError(
        f"Unknown dataset {config.dataset!r}; valid names: "
        f"{', '.join(sorted(DATASETS))}."
    ) from None
  return builder(config, process_index, process_count)
