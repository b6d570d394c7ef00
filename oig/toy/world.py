"""The toy world: procedural 64x64 scenes with exact ground truth, edit tasks and a pixel oracle.

A scene is one main object (a shape with a colour, plain or striped) on a two-tone
background (a colour above a horizon, a darker shade of it below). Everything is
rendered with hard edges from integer parameters, so the right answer of every edit
is known exactly:

* ``shape_swap``       circle -> square (same place, size, colour)   [cat -> dog analogue]
* ``color_change``     red -> blue (same shape, place, size)
* ``background_change`` gray -> beige (object untouched)
* ``appearance_change`` plain -> striped (horse -> zebra analogue)

Captions follow a fixed grammar: ``"a [striped ]{colour} {shape} on a {bg} background"``.
The :class:`Oracle` reads a scene's attributes back from pixels (corner median for the
background, dominant palette colour of the non-background pixels, best-fitting shape
mask over the object's bounding box, dark-row fraction for stripes).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np

SIZE = 64

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (215, 200, 165),
    "pink": (240, 170, 200),
    "sky": (150, 205, 240),
}
HORIZON_SHADE = 0.7  # the ground below the horizon is this fraction of the sky colour
STRIPE_COLOR = (25, 25, 25)
STRIPE_PERIOD = 6  # rows: 3 coloured, 3 dark
TASKS = ("shape_swap", "color_change", "background_change", "appearance_change")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    striped: bool
    cx: int
    cy: int
    r: int  # half extent of the object's bounding box, in pixels
    horizon: int  # first row of the darker ground

    @property
    def caption(self) -> str:
        pattern = "striped " if self.striped else ""
        return f"a {pattern}{self.color} {self.shape} on a {self.background} background"

    def replace(self, **kw) -> Scene:
        return dataclasses.replace(self, **kw)


def random_scene(rng: random.Random, striped: bool | None = None) -> Scene:
    r = rng.randint(9, 16)
    cx = rng.randint(r + 2, SIZE - r - 3)
    cy = rng.randint(r + 2, SIZE - r - 3)
    return Scene(
        shape=rng.choice(SHAPES),
        color=rng.choice(list(COLORS)),
        background=rng.choice(list(BACKGROUNDS)),
        striped=(rng.random() < 0.3) if striped is None else striped,
        cx=cx,
        cy=cy,
        r=r,
        horizon=rng.randint(38, 52),
    )


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Boolean mask of a shape whose bounding box is [cx-r, cx+r) x [cy-r, cy+r) (pixel centres)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex up, base at cy + r
        t = (dy + r) / (2 * r)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_mask(scene: Scene) -> np.ndarray:
    return shape_mask(scene.shape, scene.cx, scene.cy, scene.r)


def render(scene: Scene) -> np.ndarray:
    """Render a scene as a uint8 array (64, 64, 3)."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.float64)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    img[:] = bg
    img[scene.horizon :] = bg * HORIZON_SHADE
    m = object_mask(scene)
    img[m] = COLORS[scene.color]
    if scene.striped:
        rows = (np.arange(SIZE) - (scene.cy - scene.r)) % STRIPE_PERIOD >= STRIPE_PERIOD // 2
        img[m & rows[:, None]] = STRIPE_COLOR
    return np.round(img).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Edit tasks


@dataclass
class ToyEdit:
    id: str
    task: str
    source: Scene
    target: Scene
    source_image: np.ndarray  # uint8 HxWx3
    target_image: np.ndarray  # exact ground truth
    edit_mask: np.ndarray  # bool HxW, True where the edit may change pixels
    source_prompt: str
    target_prompt: str
    instruction: str


def make_edit(source: Scene, task: str, rng: random.Random, sample_id: str = "") -> ToyEdit:
    if task == "shape_swap":
        target = source.replace(shape=rng.choice([s for s in SHAPES if s != source.shape]))
        instruction = f"turn the {source.shape} into a {target.shape}"
        mask = object_mask(source) | object_mask(target)
    elif task == "color_change":
        target = source.replace(color=rng.choice([c for c in COLORS if c != source.color]))
        instruction = f"make the {source.shape} {target.color}"
        mask = object_mask(source)
    elif task == "background_change":
        target = source.replace(background=rng.choice([b for b in BACKGROUNDS if b != source.background]))
        instruction = f"change the background to {target.background}"
        mask = ~object_mask(source)
    elif task == "appearance_change":
        if source.striped:
            raise ValueError("appearance_change needs a plain source scene")
        target = source.replace(striped=True)
        instruction = f"make the {source.shape} striped"
        mask = object_mask(source)
    else:
        raise ValueError(f"unknown toy task {task!r}; expected one of {TASKS}")
    return ToyEdit(
        id=sample_id,
        task=task,
        source=source,
        target=target,
        source_image=render(source),
        target_image=render(target),
        edit_mask=mask,
        source_prompt=source.caption,
        target_prompt=target.caption,
        instruction=instruction,
    )


def benchmark(n_per_task: int, seed: int = 1_000_000, tasks=TASKS) -> list[ToyEdit]:
    """Held-out edit samples: ``n_per_task`` per task, deterministic in ``seed``.

    Training uses seeds below 1,000,000, so the default seed gives scenes the toy models
    never saw. Samples are interleaved by task so that any prefix covers every task.
    """
    out = []
    for i in range(n_per_task):
        for task in tasks:
            rng = random.Random(f"{seed}:{task}:{i}")
            src = random_scene(rng, striped=False)
            out.append(make_edit(src, task, rng, sample_id=f"toy_{task}_{i:04d}"))
    return out


# --------------------------------------------------------------------------------------
# Oracle


def _nearest(palette: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> tuple[str, float]:
    names = list(palette)
    cols = np.array([palette[n] for n in names], dtype=np.float64)
    d = np.linalg.norm(cols - rgb[None], axis=1)
    i = int(np.argmin(d))
    return names[i], float(d[i])


@dataclass
class Reading:
    background: str | None
    color: str | None
    shape: str | None
    striped: bool | None
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (exclusive)
    object_mask: np.ndarray | None

    @property
    def center(self) -> tuple[float, float] | None:
        if self.bbox is None:
            return None
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2


class Oracle:
    """Reads toy-world attributes from pixels. Works on uint8 or float [0, 1] HxWx3 arrays."""

    def __init__(self, bg_tol: float = 45.0, min_pixels: int = 20):
        self.bg_tol = bg_tol
        self.min_pixels = min_pixels

    @staticmethod
    def _as_uint8(img) -> np.ndarray:
        a = np.asarray(img)
        if a.dtype != np.uint8:
            a = np.clip(np.round(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        if a.shape[:2] != (SIZE, SIZE):
            from PIL import Image

            a = np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BILINEAR))
        return a

    def read(self, img) -> Reading:
        a = self._as_uint8(img).astype(np.float64)
        top = np.concatenate([a[:4, :4].reshape(-1, 3), a[:4, -4:].reshape(-1, 3)])
        bg_rgb = np.median(top, axis=0)
        background, _ = _nearest(BACKGROUNDS, bg_rgb)
        bg = np.array(BACKGROUNDS[background], dtype=np.float64)
        d_sky = np.linalg.norm(a - bg, axis=2)
        d_ground = np.linalg.norm(a - bg * HORIZON_SHADE, axis=2)
        fg = (d_sky > self.bg_tol) & (d_ground > self.bg_tol)
        if fg.sum() < self.min_pixels:
            return Reading(background, None, None, None, None, None)
        # the object is the largest blob; use the bounding box of foreground pixels after
        # dropping isolated pixels (rows/cols with very few fg pixels at the fringe)
        ys, xs = np.nonzero(fg)
        x0, x1 = np.percentile(xs, [1, 99])
        y0, y1 = np.percentile(ys, [1, 99])
        x0, y0 = int(np.floor(x0)), int(np.floor(y0))
        x1, y1 = int(np.ceil(x1)) + 1, int(np.ceil(y1)) + 1
        pix = a[fg]
        dark = np.linalg.norm(pix - np.array(STRIPE_COLOR), axis=1) < 60
        colored = pix[~dark] if (~dark).sum() >= self.min_pixels // 2 else pix
        names = list(COLORS)
        cols = np.array([COLORS[n] for n in names], dtype=np.float64)
        votes = np.argmin(np.linalg.norm(colored[:, None] - cols[None], axis=2), axis=1)
        color = names[int(np.bincount(votes, minlength=len(names)).argmax())]
        # shape: the ideal mask over the bbox that best matches the fg mask (IoU)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        r = max(x1 - x0, y1 - y0) / 2
        best, best_iou = None, -1.0
        for s in SHAPES:
            m = shape_mask(s, cx, cy, r)
            iou = (m & fg).sum() / max((m | fg).sum(), 1)
            if iou > best_iou:
                best, best_iou = s, iou
        striped = bool(dark.mean() > 0.2)
        return Reading(background, color, best, striped, (x0, y0, x1, y1), fg)

    def check(self, img, scene: Scene) -> dict[str, bool]:
        """Which attributes of ``scene`` the image shows."""
        rd = self.read(img)
        return {
            "background": rd.background == scene.background,
            "color": rd.color == scene.color,
            "shape": rd.shape == scene.shape,
            "striped": rd.striped == scene.striped,
        }


TASK_ATTRIBUTE = {
    "shape_swap": "shape",
    "color_change": "color",
    "background_change": "background",
    "appearance_change": "striped",
}
