"""Image I/O and preprocessing, written once for every editor and dataset."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

MIN_SIDE = 16
MAX_PIXELS = 80_000_000  # refuse decompression bombs beyond this; huge-but-sane photos are downscaled


class ImageError(ValueError):
    """A file that cannot be used as an input image; the message names the file and the problem."""


def to_rgb(img: Image.Image, source: str = "<image>") -> Image.Image:
    """EXIF-transpose and convert any PIL mode (RGBA, LA, P, CMYK, I;16, F, ...) to 8-bit RGB.

    Transparent pixels are composited on white; 16-bit and float images are rescaled by their
    range (16-bit by 1/257) rather than clipped.
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a broken EXIF block should not lose the image
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", source, e)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.float64)
        scale = 257.0 if (img.mode.startswith("I;16") or a.max() > 255) else 1.0
        a = np.clip(a / scale, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255.0
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, or raise :class:`ImageError` saying which file and why."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            im.load()
            img = to_rgb(im, str(path))
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image or an unsupported format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None
    check_size(img, str(path))
    return img


def check_size(img: Image.Image, source: str = "<image>"):
    if min(img.size) < MIN_SIDE:
        raise ImageError(f"{source}: image too small ({img.size[0]}x{img.size[1]}; the shorter side must be >= {MIN_SIDE})")


def target_size(w: int, h: int, resolution: int, multiple: int, mode: str = "keep_aspect") -> tuple[int, int]:
    """Output (width, height).

    ``keep_aspect``: the long side becomes ``resolution``, the short side keeps the aspect ratio;
    both are rounded to ``multiple`` (at least one multiple). ``square``: ``resolution`` x
    ``resolution`` (the official OIG / pix2pix-zero / PnP preprocessing, which distorts).
    """
    if mode == "square":
        return resolution, resolution
    if mode != "keep_aspect":
        raise ValueError(f"unknown resize mode {mode!r}; use keep_aspect or square")
    s = resolution / max(w, h)
    rw = max(multiple, int(round(w * s / multiple)) * multiple)
    rh = max(multiple, int(round(h * s / multiple)) * multiple)
    return rw, rh


def preprocess(img: Image.Image, resolution: int, multiple: int, mode: str = "keep_aspect") -> Image.Image:
    size = target_size(*img.size, resolution, multiple, mode)
    if img.size == size:
        return img
    return img.resize(size, Image.LANCZOS)


def resize_mask(mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    if mask is None:
        return None
    m = Image.fromarray(np.asarray(mask).astype(np.uint8) * 255)
    if m.size != size:
        m = m.resize(size, Image.NEAREST)
    return np.asarray(m) > 127


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float tensor (1, 3, H, W) in [-1, 1]."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> list of RGB PIL images (clamped)."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(i) for i in a]


def to_unit(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw, text: str, width: int, size: int, min_size: int = 8):
    """``(text, font)`` that fits in ``width`` pixels: the font shrunk down to ``min_size``, then the
    text shortened with an ellipsis."""
    for s in range(size, min_size - 1, -1):
        font = _font(s)
        if draw.textlength(text, font=font) <= width:
            return text, font
    font = _font(min_size)
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…", font


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2,
              row_labels: list[str] | None = None) -> Image.Image:
    """Tile images (rows x columns, all resized to the first image's size) into one picture.

    ``labels``: column headers, centred above each column, in a font that fits the column (shrunk,
    then shortened with "…" only when even the smallest size is too wide). ``row_labels``: one text
    per row, drawn in a left margin as wide as the longest of them, so nothing is clipped."""
    from PIL import ImageDraw

    w, h = rows[0][0].size
    ncol = max(len(r) for r in rows)
    size = max(10, min(16, w // 6))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heads = [_fit_text(probe, lab, w, size) for lab in (labels or [])[:ncol]]
    top = (max(probe.textbbox((0, 0), t, font=f)[3] for t, f in heads) + 2 * pad) if heads else 0
    left = 0
    row_font = _font(size)
    if row_labels:
        left = int(max(probe.textlength(t, font=row_font) for t in row_labels)) + 3 * pad
    grid = Image.new("RGB", (left + ncol * (w + pad) + pad, top + len(rows) * (h + pad) + pad), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    for j, (text, font) in enumerate(heads):
        x = left + pad + j * (w + pad) + (w - d.textlength(text, font=font)) / 2
        d.text((x, pad), text, fill=(0, 0, 0), font=font)
    for i, r in enumerate(rows):
        y = top + pad + i * (h + pad)
        if row_labels and i < len(row_labels):
            d.text((pad, y + h / 2), row_labels[i], fill=(0, 0, 0), font=row_font, anchor="lm")
        for j, im in enumerate(r):
            if im is None:
                continue
            grid.paste(im.resize((w, h)), (left + pad + j * (w + pad), y))
    return grid
