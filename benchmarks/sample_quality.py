r"""Sample quality against network calls (NFE) for every sampler: the frontier.

  python benchmarks/sample_quality.py --text_workdir=/tmp/synth --image_workdir=/tmp/digits_cond
  python benchmarks/sample_quality.py --text_workdir=... --steps=8,32,128 --num_samples=500

Text (a run of configs/synthetic_text.py): the exact judge. Every sampler draws
--num_samples sequences at each step count; the source scores them exactly —
NLL per token (bits) under the true source, next to the samples' unigram
entropy and the source's entropy rate (below it, a sampler is trading diversity
for likelihood).

Images (a class-conditional digits run, ideally trained with
config.label_dropout > 0 so that guidance applies): a reference-free measure
with no download — an MLP classifier (scikit-learn) fitted on the digits
training split scores class-conditional samples by the accuracy with which it
recognises their class, and by the Fréchet distance between the statistics of
its hidden features on the samples and on the held-out test images (FD of the
test images against the training images is printed as the floor).

Writes <out>.json (every row), <out>.png (the frontier) and prints a markdown
table. Either workdir may be omitted.
"""

import argparse
import json
import math
import os
import time

import jax
import numpy as np

from md4_jax.experiment import parallel
from md4_jax.metrics import sample_stats
from md4_jax.run import workdir as workdir_lib
from md4_jax.data import digits as digits_data
from md4_jax.data import synthetic
from md4_jax.diffusion import sampling

NO_CACHE = dict(cache=False)
# name -> (sampler, its own and the shared options: sampling.configure's keywords)
TEXT_SAMPLERS = {
    "ancestral": ("ancestral", {}),
    "topp0.9": ("topp", dict(top_p=0.9)),
    "remdm-cap0.02": ("remdm", dict(eta=0.02, remask="cap", **NO_CACHE)),
    "remdm-rescale0.1": ("remdm", dict(eta=0.1, remask="rescale", **NO_CACHE)),
    "remdm-loop0.05": ("remdm", dict(eta=0.05, remask="loop", **NO_CACHE)),
    "ordered-confidence": ("ordered", dict(order="confidence", **NO_CACHE)),
    "ordered-margin": ("ordered", dict(order="margin", **NO_CACHE)),
    "ordered-entropy": ("ordered", dict(order="entropy", **NO_CACHE)),
    "first_hitting": ("first_hitting", {}),
}
IMAGE_SAMPLERS = {
    "ancestral": ("ancestral", {}),
    "remdm-rescale0.1": ("remdm", dict(eta=0.1, remask="rescale", **NO_CACHE)),
    "ordered-confidence": ("ordered", dict(order="confidence", **NO_CACHE)),
}


def _draw(experiment, variables, sampler, steps, options, num, seed, cond=None):
  """num samples (batched over the run's mesh) and the NFE per sample."""
  shards = parallel.batch_size_per_shard(experiment.mesh)
  batch = -(-num // shards) * shards
  fn = experiment.sampler(steps=steps, sampler=sampler, options=options)
  z = sampling.all_masked(experiment.model, batch)
  if cond is not None:
    cond = np.resize(cond, batch)
  tokens, stats = fn(variables, jax.random.key(seed), z, cond)
  return np.asarray(parallel.gather(tokens))[:num], float(parallel.fetch(stats["nfe"]))


def text_frontier(workdir, steps_list, num, names=None, seed=0):
  config, experiment, state = workdir_lib.restore_run(workdir)
  source = synthetic.source_from_config(config)
  variables = {"params": state.ema_params}
  rows = []
  for name in names or TEXT_SAMPLERS:
    sampler, options = sampling.configure(TEXT_SAMPLERS[name][0], **TEXT_SAMPLERS[name][1])
    for steps in (steps_list if sampler.on_grid else [None]):
      start = time.time()
      tokens, nfe = _draw(experiment, variables, sampler, steps, options, num, seed)
      score = source.score(tokens)
      rows.append({
          "sampler": name, "steps": steps, "nfe": nfe,
          "nll_bits": score["source_nll_bits_per_token"],
          "nll_bits_stderr": score["source_nll_per_token_stderr"] / math.log(2),
          "unigram_entropy": float(sample_stats.unigram_entropy(tokens).mean()),
          "seconds": time.time() - start})
      print(f"text {name:20s} steps={steps} nfe={nfe:.0f} nll={rows[-1]['nll_bits']:.3f} "
            f"bits/token", flush=True)
  entropy = source.entropy(config.data_shape[0]) / (config.data_shape[0] * math.log(2))
  return {"source_entropy_bits": entropy, "rows": rows}


def _classifier(seed=0):
  """An MLP fitted on the digits training split; (predict, features) on [N, 64] pixels."""
  from sklearn import neural_network  # pylint: disable=g-import-not-at-top
  train = digits_data.load_split("train")
  x = np.stack([train[i]["x"].reshape(-1) for i in range(len(train))]).astype(np.float64) / 16
  y = np.array([train[i]["label"] for i in range(len(train))])
  mlp = neural_network.MLPClassifier((64,), max_iter=2000, random_state=seed).fit(x, y)

  def features(pixels):
    return np.maximum(pixels / 16 @ mlp.coefs_[0] + mlp.intercepts_[0], 0.0)

  return (lambda pixels: mlp.predict(pixels / 16)), features


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh(cov)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^{1/2}) of two feature sets [N, F].

  Tr (Σ_a Σ_b)^{1/2} = Tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}, a symmetric PSD matrix:
  computed from eigenvalues, so dead (constant) features cause no singular square root.
  """
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root_a = _psd_sqrt(cov_a)
  inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  trace_root = float(np.sum(np.sqrt(np.clip(inner, 0.0, None))))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def image_frontier(workdir, steps_list, num, guidances, names=None, seed=0):
  config, experiment, state = workdir_lib.restore_run(workdir)
  if not config.classes:
    raise ValueError(f"{workdir} is not class-conditional (config.classes = 0).")
  predict, features = _classifier()
  test = digits_data.load_split("test")
  test_x = np.stack([test[i]["x"].reshape(-1) for i in range(len(test))]).astype(np.float64)
  train = digits_data.load_split("train")
  train_x = np.stack([train[i]["x"].reshape(-1) for i in range(len(train))]).astype(np.float64)
  test_features = features(test_x)
  floor = frechet_distance(features(train_x), test_features)
  test_y = np.array([test[i]["label"] for i in range(len(test))])
  real_accuracy = float(np.mean(predict(test_x) == test_y))  # The ceiling for samples.
  labels = np.arange(num) % config.classes
  variables = {"params": state.ema_params}
  rows = []
  for name in names or IMAGE_SAMPLERS:
    sampler_name, fields = IMAGE_SAMPLERS[name]
    for guidance in guidances:
      if guidance and not config.label_dropout:
        continue  # Guidance needs a model trained with label dropout.
      for steps in steps_list:
        sampler, options = sampling.configure(sampler_name, guidance=guidance, **fields)
        tokens, nfe = _draw(experiment, variables, sampler, steps, options, num, seed,
                            cond=labels)
        pixels = tokens.reshape(num, -1).astype(np.float64)
        rows.append({"sampler": name, "guidance": guidance, "steps": steps, "nfe": nfe,
                     "accuracy": float(np.mean(predict(pixels) == labels)),
                     "fd": frechet_distance(features(pixels), test_features)})
        print(f"image {name:20s} w={guidance} steps={steps} acc={rows[-1]['accuracy']:.3f} "
              f"FD={rows[-1]['fd']:.2f}", flush=True)
  return {"fd_train_vs_test": floor, "classifier_test_accuracy": real_accuracy, "rows": rows}


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [k for k in ("text", "image") if k in results]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
  for ax, kind in zip(axes[0], panels):
    rows = results[kind]["rows"]
    key = "nll_bits" if kind == "text" else "fd"
    names = sorted({(r["sampler"], r.get("guidance", 0)) for r in rows})
    for name, guidance in names:
      sel = sorted((r for r in rows if (r["sampler"], r.get("guidance", 0)) == (name, guidance)),
                   key=lambda r: r["nfe"])
      label = name if kind == "text" else f"{name} w={guidance}"
      ax.plot([r["nfe"] for r in sel], [r[key] for r in sel], marker="o", label=label)
    if kind == "text":
      ax.axhline(results["text"]["source_entropy_bits"], color="k", ls="--", label="source entropy")
      ax.set_ylabel("exact sample NLL (bits/token)")
    else:
      ax.axhline(results["image"]["fd_train_vs_test"], color="k", ls="--", label="train vs test")
      ax.set_ylabel("Fréchet distance (classifier features)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE")
    ax.set_title({"text": "synthetic text (exact judge)", "image": "digits (class-conditional)"}[kind])
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def table(results) -> str:
  lines = []
  if "text" in results:
    lines += [f"Text: source entropy {results['text']['source_entropy_bits']:.3f} bits/token",
              "| sampler | steps | NFE | exact NLL (bits/token) | unigram entropy (nats) |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps'] or '—'} | {r['nfe']:.1f} | {r['nll_bits']:.3f} ± "
              f"{r['nll_bits_stderr']:.3f} | {r['unigram_entropy']:.3f} |"
              for r in results["text"]["rows"]]
  if "image" in results:
    lines += ["", f"Images: FD of the test images vs the training images "
              f"{results['image']['fd_train_vs_test']:.2f}; the classifier's accuracy on the "
              f"test images {results['image']['classifier_test_accuracy']:.3f}",
              "| sampler | guidance | steps | NFE | accuracy | FD |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['guidance']} | {r['steps']} | {r['nfe']:.1f} | "
              f"{r['accuracy']:.3f} | {r['fd']:.2f} |" for r in results["image"]["rows"]]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--text_workdir", default=None)
  parser.add_argument("--image_workdir", default=None)
  parser.add_argument("--steps", default="8,16,32,64,128,256")
  parser.add_argument("--num_samples", type=int, default=1000)
  parser.add_argument("--guidance", default="0,1,2")
  parser.add_argument("--text_samplers", default=",".join(TEXT_SAMPLERS))
  parser.add_argument("--image_samplers", default=",".join(IMAGE_SAMPLERS))
  parser.add_argument("--out", default="benchmarks/results/sample_quality")
  args = parser.parse_args()
  steps = [int(s) for s in args.steps.split(",")]
  results = {}
  if args.text_workdir:
    results["text"] = text_frontier(args.text_workdir, steps, args.num_samples,
                                    args.text_samplers.split(","))
  if args.image_workdir:
    results["image"] = image_frontier(args.image_workdir, steps, args.num_samples,
                                      [float(g) for g in args.guidance.split(",")],
                                      args.image_samplers.split(","))
  if not results:
    parser.error("Pass --text_workdir and/or --image_workdir.")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(results, f, indent=2)
  plot(results, args.out + ".png")
  print(table(results))
  print(f"-> {args.out}.json, {args.out}.png")


if __name__ == "__main__":
  main()
