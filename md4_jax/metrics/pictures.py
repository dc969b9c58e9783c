"""Turning token samples into things a person looks at: PNG grids, text files."""

import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from md4_jax import paths


def image_grid(images_BxHxWxC: np.ndarray, vocab_size: int, ncols: Optional[int] = None,
               pad: int = 1, mask_id: Optional[int] = None) -> np.ndarray:
  """Tiles token images (values in [0, V), mask id shown red) into uint8 [H', W', 3]."""
  x = np.asarray(images_BxHxWxC)
  b, h, w, c = x.shape
  masked = (x == mask_id) if mask_id is not None else np.zeros(x.shape, bool)
  img = np.clip(x, 0, vocab_size - 1).astype(np.float32) * (255.0 / max(vocab_size - 1, 1))
  img = np.repeat(img, 3, axis=-1) if c == 1 else img[..., :3]
  any_mask = masked.any(-1)
  img[any_mask] = np.array([255.0, 0.0, 0.0])
  ncols = ncols or int(math.ceil(math.sqrt(b)))
  nrows = int(math.ceil(b / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 128, np.uint8)
  for i in range(b):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img[i]
  return grid


def bar_image(values: np.ndarray, height: int = 96, max_bars: int = 1024) -> np.ndarray:
  """A bar plot as uint8 [H, W, 3]: one dark bar per value (the first max_bars),
  heights scaled so the largest value fills the image (values must be >= 0)."""
  v = np.asarray(values, np.float64).reshape(-1)[:max_bars]
  width = max(1, 512 // len(v))
  top = v.max() if v.size and v.max() > 0 else 1.0
  bars = np.round(v / top * (height - 1)).astype(int)
  img = np.full((height, len(v) * width, 3), 255, np.uint8)
  rows = np.arange(height)[:, None]
  filled = rows >= (height - 1 - np.repeat(bars, width))[None, :]
  img[filled] = (40, 70, 140)
  return img


def save_png(grid_HxWx3: np.ndarray, path: str, scale: int = 1) -> str:
  im = Image.fromarray(grid_HxWx3)
  if scale > 1:
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
  with paths.open(path, "wb") as f:
    im.save(f, format="PNG")
  return path


def save_texts(texts: Sequence[str], path: str) -> str:
  with paths.open(path, "w") as f:
    for i, text in enumerate(texts):
      f.write(f"=== sample {i} ===\n{text}\n")
  return path


def decode_all(tokens_BxL: np.ndarray, decode: Callable[[np.ndarray], str]) -> list[str]:
  return [decode(np.asarray(row)) for row in tokens_BxL]


def trajectory_grid(frames_KxBxHxWxC: np.ndarray, vocab_size: int, mask_id: int,
                    max_examples: int = 8, pad: int = 1) -> np.ndarray:
  """One row per example, one column per frame (all-mask → clean): uint8 [H', W', 3].

  Masked pixels are red, as in `image_grid`.
  """
  frames = np.asarray(frames_KxBxHxWxC)[:, :max_examples]
  k, b = frames.shape[:2]
  tiles = frames.transpose(1, 0, *range(2, frames.ndim)).reshape((b * k,) + frames.shape[2:])
  return image_grid(tiles, vocab_size, ncols=k, pad=pad, mask_id=mask_id)


def save_gif(frames_KxBxHxWxC: np.ndarray, path: str, vocab_size: int, mask_id: int,
             scale: int = 4, frame_ms: int = 150, hold_ms: int = 1500) -> str:
  """An animated GIF: frame k is the grid of all examples at trajectory frame k."""
  images = []
  for frame in np.asarray(frames_KxBxHxWxC):
    im = Image.fromarray(image_grid(frame, vocab_size, mask_id=mask_id))
    if scale > 1:
      im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    images.append(im)
  durations = [frame_ms] * (len(images) - 1) + [hold_ms]
  with paths.open(path, "wb") as f:
    images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                   duration=durations, loop=0)
  return path


def text_trajectory(frames_KxBxL: np.ndarray, decode: Callable[[np.ndarray], str],
                    max_examples: int = 4) -> list[str]:
  """For each example, its decoded frames (masks as the decoder shows them), one per line."""
  frames = np.asarray(frames_KxBxL)
  return ["\n".join(f"[{k}] {decode(frames[k, b])}" for k in range(frames.shape[0]))
          for b in range(min(max_examples, frames.shape[1]))]


MAX_GRID_IMAGES = 256


def save_samples(tokens: np.ndarray, base: str, vocab_size: int, codec: Any = None,
                 scale: int = 4) -> tuple[str, Union[np.ndarray, list[str]]]:
  """Writes samples for a person to look at: `base`.png (images) or `base`.txt (text).

  Args:
    tokens: int [B, *data_shape] samples.
    base: path without extension.
    vocab_size: V (pixel values are scaled by it).
    codec: the dataset's TextCodec (`DatasetInfo.text_codec`); None for images.
    scale: PNG upscaling.

  Returns:
    (path, shown): the file and what it shows, the uint8 grid of the first
    MAX_GRID_IMAGES images or the decoded texts.
  """
  tokens = np.asarray(tokens)
  if codec is None:
    grid = image_grid(tokens[:MAX_GRID_IMAGES], vocab_size)
    return save_png(grid, base + ".png", scale=scale), grid
  texts = decode_all(tokens, codec.decode)
  return save_texts(texts, base + ".txt"), texts


def save_trajectory(frames_KxBx: np.ndarray, base: str, vocab_size: int, mask_id: int,
                    codec: Any = None) -> list[str]:
  """Writes a trajectory (frames from all-mask to the samples): PNG grid + GIF, or text."""
  if codec is None:
    grid = trajectory_grid(frames_KxBx, vocab_size, mask_id)
    return [save_png(grid, base + "_trajectory.png", scale=4),
            save_gif(frames_KxBx, base + "_trajectory.gif", vocab_size, mask_id)]
  return [save_texts(text_trajectory(frames_KxBx, codec.decode), base + "_trajectory.txt")]
