"""Image helpers shared by sample.py and evaluate.py: grids and PNGs that remember their prompt.

Images smaller than VIEW_SIZE on their short side (the built-in model's 16x16 digits) are saved scaled up by an
integer factor, nearest neighbour, so that they can be looked at; the PNG text chunk records the native size.
scale_up=False saves them as they are (what code that reads the images back needs)."""
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


VIEW_SIZE = 128


def view_factor(height: int, width: int) -> int:
    """The smallest integer factor that brings the short side to VIEW_SIZE or more (1 for images that are)."""
    return max(1, math.ceil(VIEW_SIZE / min(height, width)))


def enlarge(images: np.ndarray, factor: int) -> np.ndarray:
    """(..., H, W, 3) -> (..., factor * H, factor * W, 3), every pixel a factor x factor block."""
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2)


def save_png(image: np.ndarray, path, scale_up: bool = True, **text) -> None:
    """Save (H, W, 3) uint8 as PNG, with each keyword (prompt, seed, model, ...) in a PNG text chunk; scaled up
    if small (the module docstring), with its native size as "native_size" (WxH) in the text chunk."""
    height, width = image.shape[:2]
    factor = view_factor(height, width) if scale_up else 1
    if factor > 1:
        image, text = enlarge(image, factor), {**text, "native_size": f"{width}x{height}"}
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))
    atomic_write(Path(path), lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info))


def save_grid(images: np.ndarray, path, cols: int | None = None, scale_up: bool = True, **text) -> None:
    """A grid of (N, H, W, 3) uint8 images as one PNG; small images are scaled up one by one (as save_png scales
    one image), so the 2-pixel gaps stay thin. The text chunk gets the images' native size as "native_size"."""
    height, width = images.shape[1:3]
    factor = view_factor(height, width) if scale_up else 1
    if factor > 1:
        images, text = enlarge(images, factor), {**text, "native_size": f"{width}x{height}"}
    save_png(grid(images, cols), path, scale_up=False, **text)


def read_png_text(path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)
