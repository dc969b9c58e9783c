"""GenMD4: the per-token schedule's loss, its leave-one-out gradient, its sampler, its runs.

Every check compares with a closed form or an exact enumeration that a plausible
wrong implementation (a missing Σ_v w_v μ_v term, a missing (1 − t1) factor, no
score-function term, a shared reveal probability) fails.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from md4_jax import evaluate
from md4_jax.experiment import parallel
from md4_jax.experiment import validation
from md4_jax.run import workdir as workdir_lib
from md4_jax.diffusion import genmd4
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import sampling
from md4_jax.diffusion import schedules
from md4_jax.experiment import build


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def _genmd4(network, vocab, shape, powers=None, eps=schedules.EPS, **kwargs):
  """(GenMD4 around `network`, its variables) with the exponents set to `powers`."""
  model = genmd4.GenMD4(network, schedules.PolySchedule(power=1.0, eps=eps), vocab, tuple(shape),
                        **kwargs)
  z = jnp.full((2,) + tuple(shape), vocab, jnp.int32)
  variables = model.init(jax.random.key(0), z, jnp.ones((2,)), method="predict")
  variables = jax.tree.map(jnp.asarray, nn.unbox(variables))
  # `predict` does not touch w_raw: initialise it through `powers`.
  params = dict(variables["params"])
  params["w_raw"] = model.init(jax.random.key(0), method="powers")["params"]["w_raw"]
  if powers is not None:
    params["w_raw"] = jnp.asarray([genmd4.raw_from_power(p) for p in powers], jnp.float32)
  return model, {"params": params}


# ------------------------------------------------------------------- loss ---


@pytest.mark.parametrize("power", [1.0, 2.5])
def test_equal_powers_give_exactly_the_polyk_md4_loss_and_gradients(power):
  """All w_v = K: GenMD4's terms equal MD4 polyK's on the same t and masks (ε = 0 and
  t1 = 0, where both schedules are 1 − t^K), network gradients included."""
  vocab, length, batch = 6, 10, 16
  network = helpers.CopyLeft(vocab, time_weight=0.5)
  gen, gen_vars = _genmd4(network, vocab, (length,), eps=0.0, t1=0.0, power_init=power)
  md4 = model_lib.MD4(network, schedules.PolySchedule(power=power, eps=0.0), vocab, (length,))
  md4_vars = {"params": {"network": gen_vars["params"]["network"]}}
  k_x, k_t, k_n = jax.random.split(jax.random.key(3), 3)
  x = jax.random.randint(k_x, (batch, length), 0, vocab)
  t = 1.0 - jax.random.uniform(k_t, (batch,))
  noise = jax.random.uniform(k_n, (batch, length))

  @functools.partial(jax.jit, static_argnums=0)
  def terms(model, variables, noise):
    return model.apply(variables, x, t=t, noise=noise, method="nelbo")

  got, want = terms(gen, gen_vars, noise), terms(md4, md4_vars, noise)
  for key in ("loss_diff", "loss_recon", "loss_prior", "loss"):
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-5, err_msg=key)
  assert float(jnp.max(want["loss_diff"])) > 1.0  # Not a trivially zero comparison.
  # Two masks at once: the mean of the two single-mask losses.
  noise2 = jax.random.uniform(jax.random.key(4), (batch, length))
  both = terms(gen, gen_vars, jnp.stack([noise, noise2], axis=1))
  np.testing.assert_allclose(
      both["loss_diff"], 0.5 * (want["loss_diff"] + terms(md4, md4_vars, noise2)["loss_diff"]),
      rtol=2e-5, atol=1e-5)
  # Network gradients: Σ_v w_v μ_v is constant (= K) when all w are equal.
  grad = lambda model, v: jax.jit(jax.grad(
      lambda p: jnp.mean(terms(model, {"params": p}, noise)["loss"])))(v["params"])["network"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grad(gen, gen_vars), grad(md4, md4_vars))


def test_input_ignoring_network_matches_the_closed_form_nelbo():
  """E[NELBO] = Σ_n (1 − ε)(1 − t1^{w_x})[−log π_x − 1 + E_π[w]/w_x] + recon + prior."""
  vocab, length = 4, 6
  pi = np.array([0.1, 0.2, 0.3, 0.4])
  powers = np.array([0.5, 1.0, 2.0, 3.5])
  t1, eps = 0.2, 1e-4  # A large t1, so a missing (1 − t1) factor or recon term shows.
  logits = np.broadcast_to(np.log(pi), (length, vocab))
  network = helpers.FixedLogits(length, vocab)
  model, variables = _genmd4(network, vocab, (length,), powers=powers, eps=eps, t1=t1)
  variables["params"]["network"] = {"logits": jnp.asarray(logits, jnp.float32)}
  x_row = np.array([0, 1, 2, 3, 3, 1])
  batch = 40_000
  x = jnp.broadcast_to(jnp.asarray(x_row), (batch, length))
  k_t, k_n = jax.random.split(jax.random.key(0))
  u = 1.0 - jax.random.uniform(k_t, (batch,))
  noise = jax.random.uniform(k_n, (batch, length))
  out = jax.jit(lambda v: model.apply(v, x, t=u, noise=noise, method="nelbo"))(variables)
  loss = np.asarray(out["loss"], np.float64)
  w_x = powers[x_row]
  e_w = float(pi @ powers)
  diff = np.sum((1 - eps) * (1 - t1 ** w_x) * (-np.log(pi[x_row]) - 1 + e_w / w_x))
  log_t1 = math.log(t1)
  recon = np.sum((1 - eps) * t1 ** w_x
                 * (np.log(np.sum(np.exp(powers * log_t1))) - w_x * log_t1))
  prior = length * eps * math.log(vocab)
  want = diff + recon + prior
  np.testing.assert_allclose(float(out["loss_recon"][0]), recon, rtol=1e-4)
  stderr = loss.std() / math.sqrt(batch)
  assert abs(loss.mean() - want) < 4 * stderr, (loss.mean(), want, stderr)
  assert stderr < 0.02 * want  # The comparison has power (a 10 % error is > 4 SE).


@pytest.mark.slow
def test_leave_one_out_gradient_is_unbiased_and_needs_the_score_term():
  """D = 2, V = 3, fixed t: the exact gradient of E_z[ℓ(z)] over all 4 masks vs the
  mean RLOO gradient over many draws (K = 2); the pathwise gradient alone is biased."""
  vocab, length = 3, 2
  network = helpers.CopyLeft(vocab)
  powers = [0.5, 1.5, 3.0]
  model, variables = _genmd4(network, vocab, (length,), powers=powers, t1=1e-3)
  x = jnp.asarray([[0, 2]])
  u = jnp.asarray([0.6])
  params = variables["params"]

  def loss_diff(w_raw, noise):
    p = dict(params, w_raw=w_raw)
    return model.apply({"params": p}, x, t=u, noise=noise, method="nelbo")

  def exact(w_raw):  # Σ_z q(z | x) ℓ(z), z over {kept, masked}^2.
    w = genmd4.powers_from_raw(w_raw)[x[0]]
    t = model.t1 + (1 - model.t1) * u[0]
    p_mask = (1 - model.eps) * t ** w
    total = 0.0
    for pattern in [(0, 0), (0, 1), (1, 0), (1, 1)]:
      m = jnp.asarray(pattern, bool)
      q = jnp.prod(jnp.where(m, p_mask, 1 - p_mask))
      noise = jnp.where(m, 0.999999, 0.0)[None]  # Masked iff noise >= α.
      total += q * loss_diff(w_raw, noise)["loss_diff"][0]
    return total

  w_raw = params["w_raw"]
  want = np.asarray(jax.grad(exact)(w_raw))
  draws = 6000
  noise = jax.random.uniform(jax.random.key(1), (draws, 1, 2, length))

  def surrogate(w_raw, noise):
    out = loss_diff(w_raw, noise)
    return out["loss_diff"][0] + out["loss_score"][0]

  def pathwise(w_raw, noise):
    return loss_diff(w_raw, noise)["loss_diff"][0]

  for fn, unbiased in ((surrogate, True), (pathwise, False)):
    g = np.asarray(jax.jit(jax.vmap(jax.grad(fn), in_axes=(None, 0)))(w_raw, noise))
    mean, se = g.mean(0), g.std(0) / math.sqrt(draws) + 1e-6
    z_scores = np.abs(mean - want) / se
    if unbiased:
      assert np.all(z_scores < 4), (mean, want, se)
    else:
      assert np.max(z_scores) > 8, (mean, want, se)
  assert np.max(np.abs(want)) > 0.1


# ---------------------------------------------------------------- sampler ---


class TimePosterior(nn.Module):
  """The exact posterior of an input-ignoring source: μ_t(v) ∝ π_v·t^{w_v}."""

  log_pi: tuple
  powers: tuple

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del cond, train
    logits = (jnp.asarray(self.log_pi)[None]
              + jnp.asarray(self.powers)[None] * jnp.log(t)[:, None])  # [B, V]
    return jnp.broadcast_to(logits[:, None], z.shape + (len(self.powers),))


_PI = np.array([0.4, 0.3, 0.2, 0.1])
_POWERS = np.array([3.0, 0.4, 1.0, 2.0])


def _draw(model, variables, steps, sampler="ancestral", batch=512,
          options=sampling.SamplerOptions()):
  fn = jax.jit(lambda v, r: sampling.sample(model, v, r, batch_size=batch, steps=steps,
                                            sampler=sampler, options=options))
  return fn(variables, jax.random.key(7))


def _grid_chain_law(pi, powers, steps):
  """Final token law of one position of the chain with a constant prediction π."""
  ts = np.arange(steps + 1) / steps
  law, still = np.zeros_like(pi), 1.0
  for i in range(steps, 0, -1):
    stay = (ts[i - 1] / ts[i]) ** powers
    law += still * pi * (1 - stay)
    still *= float(pi @ stay)
  return law


@pytest.mark.parametrize("sampler,options", [
    ("ancestral", sampling.SamplerOptions()),
    pytest.param("mean", sampling.SamplerOptions(), marks=pytest.mark.slow),
    pytest.param("ancestral", sampling.SamplerOptions(exact=False), marks=pytest.mark.slow),
])
def test_constant_prediction_follows_the_per_token_reveal_law(sampler, options):
  """μ = π at every step: token v is revealed at rate π_v·w_v/t, so the final law is
  the chain's own (→ π_v w_v / E_π[w] for many steps), not π as with a shared reveal."""
  length, steps = 32, 16
  logits = np.broadcast_to(np.log(_PI), (length, len(_PI)))
  model, variables = _genmd4(helpers.FixedLogits(length, len(_PI)), len(_PI), (length,),
                             powers=_POWERS)
  variables["params"]["network"] = {"logits": jnp.asarray(logits, jnp.float32)}
  tokens, stats = _draw(model, variables, steps, sampler, options=options)
  tokens = np.asarray(tokens)
  assert tokens.max() < len(_PI)  # Nothing left masked.
  assert int(stats["nfe"]) == steps  # Every step calls the network: no idle-step skipping.
  counts = np.bincount(tokens.ravel(), minlength=len(_PI))
  law = _grid_chain_law(_PI, _POWERS, steps)
  assert helpers.chi_square_pvalue(counts, law) > 1e-3, (counts / counts.sum(), law)
  assert helpers.chi_square_pvalue(counts, _PI) < 1e-6  # A shared reveal probability would give π.


@pytest.mark.parametrize("steps", [4, pytest.param(32, marks=pytest.mark.slow)])
def test_exact_time_dependent_posterior_recovers_the_source(steps):
  """μ_t(v) ∝ π_v t^{w_v} is the true posterior, so every step is the exact reverse
  step and the samples' law is π for any number of steps."""
  length = 32
  network = TimePosterior(tuple(np.log(_PI)), tuple(_POWERS))
  model, variables = _genmd4(network, len(_PI), (length,), powers=_POWERS)
  tokens, _ = _draw(model, variables, steps)
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=len(_PI))
  assert counts.sum() == 512 * length
  assert helpers.chi_square_pvalue(counts, _PI) > 1e-3, counts / counts.sum()


def test_first_hitting_is_refused_and_reconstruction_masks_per_token():
  length = 4000
  model, variables = _genmd4(helpers.FixedLogits(length, len(_PI)), len(_PI), (length,),
                             powers=_POWERS)
  with pytest.raises(ValueError, match="not exact for GenMD4.*ancestral"):
    sampling.sample(model, variables, jax.random.key(0), batch_size=2, steps=None,
                    sampler="first_hitting")
  x = jnp.asarray(np.arange(length) % len(_PI))[None]
  z_t, tokens, _ = sampling.reconstruct(model, variables, jax.random.key(1), x, 0.5, steps=4)
  z_t = np.asarray(z_t)[0]
  for v, w in enumerate(_POWERS):  # Masked with probability (1 − ε)·0.5^{w_v}.
    rate = np.mean(z_t[np.arange(length) % len(_PI) == v] == len(_PI))
    assert abs(rate - 0.5 ** w) < 4 * math.sqrt(0.25 / 1000), (v, rate)
  assert np.asarray(tokens).max() < len(_PI)


def test_schedule_exponents_get_no_weight_decay():
  from md4_jax.experiment import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  config = helpers.digits_tiny("tiny_genmd4", weight_decay=0.5, warmup_steps=0,
                               lr_schedule="constant", clip_grad_norm=0.0)
  optimizer, _ = optimizer_lib.build_optimizer(config)
  params = {"w_raw": jnp.ones((3,)), "network": {"kernel": jnp.ones((2,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  np.testing.assert_array_equal(updates["w_raw"], 0.0)
  assert np.all(np.asarray(updates["network"]["kernel"]) < 0)  # Decayed.


@pytest.mark.slow
def test_fused_head_chunks_give_the_plain_loss_and_gradients():
  """GenMD4 on a transformer with loss_chunk_size > 0 (the OpenWebText setting): the
  chunked head computes −log μ_x and Σ_v w_v μ_v exactly as the full logits do."""
  from md4_jax.configs import text8  # pylint: disable=g-import-not-at-top
  config = text8.get_config("tiny")
  config.update(model="genmd4", noise_schedule="linear", dropout_rate=0.0)
  config.data_shape = (24,)
  plain = build.build_model(config)
  config.loss_chunk_size = 10  # Not a divisor of 24: the padded last chunk too.
  chunked = build.build_model(config)
  x = jax.random.randint(jax.random.key(0), (4, 24), 0, 27)
  variables = plain.init({"params": jax.random.key(1), "sample": jax.random.key(2)}, x)
  variables = jax.tree.map(jnp.asarray, nn.unbox(variables))
  params = dict(variables["params"], w_raw=jnp.log(jnp.expm1(jnp.linspace(0.5, 3.0, 27))))
  t = jnp.linspace(0.1, 1.0, 4)
  noise = jax.random.uniform(jax.random.key(3), (4, 2, 24))

  def objective(model, p):
    out = model.apply({"params": p}, x, t=t, noise=noise)
    return out["loss"] + out["loss_score"], out

  (a, out_a), g_a = jax.jit(jax.value_and_grad(lambda p: objective(plain, p), has_aux=True))(params)
  (b, out_b), g_b = jax.jit(jax.value_and_grad(lambda p: objective(chunked, p),
                                               has_aux=True))(params)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(out_a["loss_diff"], out_b["loss_diff"], rtol=1e-5)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_a))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-5 * scale),
               g_a, g_b)
  assert float(jnp.max(jnp.abs(g_a["w_raw"]))) > 0


@pytest.mark.slow
def test_eight_devices_give_the_one_device_gradient():
  """The K masked copies of each example stay with it on a data-parallel mesh: the
  loss and gradient over 8 devices equal one device's (w_raw included)."""
  from md4_jax.experiment import step as step_lib  # pylint: disable=g-import-not-at-top
  config = helpers.digits_tiny("tiny_genmd4", dropout_rate=0.0)
  x = jax.random.randint(jax.random.key(0), (16, 8, 8, 1), 0, 17)
  out = {}
  for name, devices in (("8", jax.devices()), ("1", jax.devices()[:1])):
    experiment = build.setup(config, parallel.make_mesh({"data": -1}, devices=devices))
    params = experiment.init_state().params
    batch = parallel.to_global({"x": np.asarray(x)}, experiment.mesh)
    out[name] = jax.device_get(experiment.jit(
        lambda p, b: step_lib.compute_grads(experiment.model, p, b, jax.random.key(1)))(
            params, batch))
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(out["8"][1]["loss"], out["1"][1]["loss"], rtol=2e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(out["1"][0]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale),
               out["8"][0], out["1"][0])
  assert float(np.abs(out["1"][0]["w_raw"]).max()) > 0


@pytest.mark.slow
def test_sharded_sampling_equals_one_device():
  """8 devices, batch-sharded: the same tokens, frames and NFE as one device."""
  mesh = parallel.make_mesh({"data": -1})
  assert parallel.batch_size_per_shard(mesh) == 8
  vocab = len(_PI)
  model, variables = _genmd4(helpers.CopyLeft(vocab, time_weight=0.5), vocab, (12,),
                             powers=_POWERS)
  experiment = dataclasses.replace(build.setup(helpers.digits_tiny(), mesh), model=model)
  z = np.full((16, 12), vocab, np.int32)
  z[:, :3] = np.arange(3)  # A prefix.
  kwargs = dict(steps=16, sampler="ancestral", frames=4)
  one = jax.jit(lambda v, r, z: sampling.sample(model, v, r, z_init=z, **kwargs))(
      variables, jax.random.key(14), z)
  tokens, stats = experiment.sampler(**kwargs)(variables, jax.random.key(14), z)
  assert tokens.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(tokens, one[0])
  np.testing.assert_array_equal(stats["frames"], one[1]["frames"])
  assert int(stats["nfe"]) == 16 and np.all(np.asarray(tokens)[:, :3] == np.arange(3))


def test_config_errors_are_one_line_before_anything_compiles():
  base = helpers.digits_tiny("tiny_genmd4")
  validation.validate(base)
  for overrides, message in [
      ({"cont_time": False}, "cont_time=True"),
      ({"noise_schedule": "cosine"}, "not polynomial"),
      ({"noise_schedule": "poly2"}, "disagree"),
      ({"genmd4_num_masks": 1}, ">= 2 masks"),
      ({"genmd4_t1": 1.0}, r"\[0, 1\)"),
      ({"model": "md5"}, "Unknown model"),
  ]:
    config = helpers.digits_tiny("tiny_genmd4", **overrides)
    with pytest.raises(ValueError, match=message):
      validation.validate(config)
    if overrides.get("model") != "md5":
      with pytest.raises(ValueError, match=message):
        build.build_model(config)


@pytest.mark.slow
def test_training_step_learns_the_schedule():
  """One jitted train step: the K masks go through the network together, w_raw gets a
  gradient (and no weight decay), the metrics carry the RLOO term and w's range."""
  config = helpers.digits_tiny("tiny_genmd4", weight_decay=0.5, warmup_steps=1)
  experiment = build.setup(config, helpers.one_device())
  state = experiment.init_state()
  assert state.params["w_raw"].shape == (17,)
  x = jax.random.randint(jax.random.key(0), (16, 8, 8, 1), 0, 17)
  before = np.asarray(state.params["w_raw"])
  state, metrics = experiment.train_step(state, {"x": x})
  state, metrics = experiment.train_step(state, {"x": x})
  assert {"loss_score", "power_min", "power_mean", "power_max"} <= set(metrics)
  moved = np.asarray(state.params["w_raw"]) - before
  assert np.all(moved != 0) and np.std(moved) > 0  # Per-token updates, not a shared one.


# ------------------------------------------------------------------- runs ---


@pytest.mark.slow
def test_sigterm_resume_is_bit_identical_and_the_clis_work_unchanged(tmp_path):
  """A SIGTERM'd GenMD4 run, resumed, ends with the parameters (w included) and EMA of an
  uninterrupted one, bit for bit; md4_jax.sample and md4_jax.evaluate read its workdir."""
  steps = 20
  args = ["--config=configs/digits.py:tiny_genmd4", f"--config.num_train_steps={steps}",
          "--config.eval_every_steps=0", "--config.sample_every_steps=0",
          "--config.num_samples=0", "--config.checkpoint_every_steps=4",
          "--config.log_loss_every_steps=5", "--config.max_checkpoints_to_keep=2"]
  full = tmp_path / "full"
  result = helpers.run_module("md4_jax.train", *args, f"--workdir={full}")
  assert result.returncode == 0, result.stderr[-3000:]
  part = tmp_path / "part"
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(1),
             JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "md4_jax.train", *args, f"--workdir={part}"],
                          cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 400
  while not (helpers.checkpoint_steps(part) and helpers.checkpoint_steps(part)[-1] >= 4):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "Preempted at step" in out, err[-3000:]
  assert int(out.split("Preempted at step ")[1].split(":")[0]) < steps
  result = helpers.run_module("md4_jax.train", *args, f"--workdir={part}")
  assert result.returncode == 0 and "Resuming from step" in result.stderr, result.stderr[-3000:]
  states = [workdir_lib.restore_run(str(w))[2] for w in (full, part)]
  assert all(int(s.step) == steps for s in states)
  jax.tree.map(np.testing.assert_array_equal,
               *[jax.device_get((s.params, s.ema_params)) for s in states])
  assert np.ptp(np.asarray(states[0].params["w_raw"])) > 0
  # The sampling and evaluation CLIs on the GenMD4 workdir, unchanged.
  result = helpers.run_module("md4_jax.sample", f"--workdir={full}", "--num_samples=4",
                              "--steps=6", "--sampler=topp", f"--out_dir={tmp_path / 's'}")
  assert result.returncode == 0, result.stderr[-3000:]
  (info_file,) = (tmp_path / "s").glob("*.json")
  info = json.loads(info_file.read_text())
  assert info["nfe"] == 6 and info["cache"] is False
  assert np.load(str(info_file).replace(".json", ".npy")).max() < 17
  report = evaluate.evaluate_checkpoint(str(full), num_t_samples=2, mesh=helpers.one_device())
  assert report["metric"] == "bits_per_dim" and np.isfinite(report["bits_per_dim"])
  assert report["step"] == steps and report["nelbo_recon"] > 0  # GenMD4's recon at t1.
