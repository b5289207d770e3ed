"""Image helpers shared by sample.py and evaluate.py: grids and PNGs that remember their prompt."""
import math
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .models.weights import atomic_write


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) image with `pad` white pixels between cells."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        y, x = (i // cols) * (h + pad), (i % cols) * (w + pad)
        canvas[y:y + h, x:x + w] = image
    return canvas


def save_png(image: np.ndarray, path, **text) -> None:
    """Save (H, W, 3) uint8 as PNG, with each keyword (prompt, seed, model, ...) in a PNG text chunk."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))
    atomic_write(Path(path), lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info))


def read_png_text(path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)
