"""Image helpers shared by sample.py and evaluate.py: grids and PNGs that remember their prompt.

Images smaller than VIEW_SIZE on their short side (the built-in model's 16x16 digits) are saved scaled up by an
integer factor, nearest neighbour, so that they can be looked at; the PNG text chunk records the native size.
scale_up=False saves them as they are (what code that reads the images back needs)."""
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .io import atomic_write


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


def viewable(images: np.ndarray, text: dict, scale_up: bool) -> tuple[np.ndarray, dict]:
    """(..., H, W, 3) images scaled up by the smallest integer factor that brings their short side to VIEW_SIZE
    (nearest neighbour: every pixel a block), and the text chunk with their native size as "native_size" (WxH);
    as they are when scale_up is False or they are large enough."""
    height, width = images.shape[-3:-1]
    factor = math.ceil(VIEW_SIZE / min(height, width)) if scale_up else 1
    if factor <= 1:
        return images, text
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2), {**text, "native_size": f"{width}x{height}"}


def save_png(image: np.ndarray, path, scale_up: bool = True, **text) -> None:
    """Save (H, W, 3) uint8 as PNG, scaled up if small (the module docstring), with each keyword (prompt, seed,
    model, ...) in a PNG text chunk."""
    image, text = viewable(image, text, scale_up)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))
    atomic_write(Path(path), lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info))


def labelled(picture: np.ndarray, rows: list = (), title: str = "") -> np.ndarray:
    """The picture with `title` above it and rows[i] left of the i-th of its len(rows) equal rows, in PIL's
    built-in font, on white."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([measure.textbbox((0, 0), str(label), font=font)[2] for label in rows], default=-8) + 8
    line = measure.textbbox((0, 0), "Ag", font=font)[3] + 6
    top = line if title else 0
    canvas = Image.new("RGB", (picture.shape[1] + width, picture.shape[0] + top), "white")
    canvas.paste(Image.fromarray(picture), (width, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width, 2), title, fill="black", font=font)
    pitch = picture.shape[0] / max(len(rows), 1)
    for i, label in enumerate(rows):
        draw.text((2, top + (i + 0.5) * pitch - line / 2 + 3), str(label), fill="black", font=font)
    return np.asarray(canvas)


def save_grid(images: np.ndarray, path, cols: int | None = None, scale_up: bool = True, rows: list | None = None,
              title: str = "", **text) -> None:
    """A grid of (N, H, W, 3) uint8 images as one PNG; small images are scaled up one by one, as save_png scales
    one image, so that the 2-pixel gaps between them stay thin. rows: a label for each row of the grid, title a
    line above it (labelled); neither: the bare grid."""
    images, text = viewable(images, text, scale_up)
    picture = grid(images, cols)
    if rows or title:
        picture = labelled(picture, rows or [], title)
    save_png(picture, path, scale_up=False, **text)


def read_png_text(path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)
