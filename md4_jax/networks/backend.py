"""The platform a network is traced for, which is not always the host's.

A few choices depend on the accelerator: the CPU's convolution weight-gradient
path (`unet.conv_general_dilated`) and `attention_impl='auto'` (cuDNN on GPU).
Keyed on `jax.default_backend()` they would follow the machine that traces,
so an ahead-of-time compile for a TPU slice on a CPU host (`md4_jax.plan`)
would bake the CPU path into the TPU program. The experiment traces every
jitted function inside `target(platform of the mesh's devices)`; outside one,
the default backend is the target.
"""

import contextlib
import contextvars

import jax

_TARGET = contextvars.ContextVar("md4_jax_target_platform", default=None)


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform being traced for."""
  name = _TARGET.get() or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


@contextlib.contextmanager
def target(name: str):
  """Traces inside it are for devices of platform `name` (e.g. a mesh's devices[0].platform)."""
  token = _TARGET.set(name)
  try:
    yield
  finally:
    _TARGET.reset(token)
