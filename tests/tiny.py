"""Tiny configs shared by the tests (sized for a 2-core CPU)."""

from configs import digits


def digits_config(variant: str = "", **overrides):
  """configs/digits.py (optionally a variant, e.g. 'cond') with an 8-channel one-level UNet."""
  config = digits.get_config(variant) if variant else digits.get_config()
  config.unet.channels = 8
  config.unet.channel_mult = (1,)
  config.unet.attn_resolutions = ()
  config.unet.embed_dim = 4
  config.batch_size = 16
  config.eval_batch_size = 40
  config.update(overrides)
  return config
