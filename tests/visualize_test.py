"""md4_jax.metrics.pictures: what a person looks at, for images and for text."""

import numpy as np
from PIL import Image

from md4_jax.metrics import pictures
from md4_jax.data import text8


def test_image_samples_and_trajectory(tmp_path):
  tokens = np.random.default_rng(0).integers(0, 17, (5, 8, 8, 1))
  path, grid = pictures.save_samples(tokens, str(tmp_path / "s"), 17)
  assert path.endswith("s.png") and grid.dtype == np.uint8
  assert grid.shape == (2 * 9 + 1, 3 * 9 + 1, 3)  # 5 images: 3 columns, 2 rows, 1-pixel borders.
  assert np.asarray(Image.open(path)).shape == (4 * grid.shape[0], 4 * grid.shape[1], 3)
  frames = np.stack([np.full_like(tokens, 17), tokens])  # All-mask, then the samples.
  png, gif = pictures.save_trajectory(frames, str(tmp_path / "s"), 17, mask_id=17)
  picture = np.asarray(Image.open(png))
  red = (picture[..., 0] == 255) & (picture[..., 1] == 0)
  assert red[:, : picture.shape[1] // 2].mean() > 0.5 and not red[:, -4 * 9:].any()
  assert Image.open(gif).n_frames == 2


def test_text_samples_and_trajectory(tmp_path):
  codec = text8.INFO.text_codec("")
  tokens = np.stack([text8.encode("hello world"), text8.encode("masked text")])
  path, texts = pictures.save_samples(tokens, str(tmp_path / "t"), 27, codec)
  assert texts == ["hello world", "masked text"]
  assert open(path).read() == "=== sample 0 ===\nhello world\n=== sample 1 ===\nmasked text\n"
  frames = np.stack([np.full_like(tokens, 27), tokens])
  (traj,) = pictures.save_trajectory(frames, str(tmp_path / "t"), 27, 27, codec)
  assert "[0] ___________\n[1] hello world" in open(traj).read()


def test_bar_image_heights_follow_the_values():
  img = pictures.bar_image(np.array([1.0, 0.6, 0.0, 2.0]), height=11)
  assert img.shape == (11, 4 * 128, 3) and img.dtype == np.uint8
  dark = (img[..., 0] == 40).sum(axis=0)[::128]  # Filled pixels per bar column.
  np.testing.assert_array_equal(dark, [6, 4, 1, 11])  # round(v / 2 · 10) + 1.
