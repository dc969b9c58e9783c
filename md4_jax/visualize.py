"""Turning token samples into things a person looks at: PNG grids, text files."""

import math
import os
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image


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


def save_png(grid_HxWx3: np.ndarray, path: str, scale: int = 1) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  im = Image.fromarray(grid_HxWx3)
  if scale > 1:
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
  im.save(path)
  return path


def save_texts(texts: Sequence[str], path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    for i, text in enumerate(texts):
      f.write(f"=== sample {i} ===\n{text}\n")
  return path


def decode_all(tokens_BxL: np.ndarray, decode: Callable[[np.ndarray], str]) -> list[str]:
  return [decode(np.asarray(row)) for row in tokens_BxL]
