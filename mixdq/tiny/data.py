"""Procedural captioned scenes for the embedded tiny model.

Every image is 1-3 flat shapes on a plain background, and its caption names every attribute
(shape, colour, size, position, background), so the caption fixes the image up to a few pixels
of jitter. That makes text alignment exactly measurable, and makes the conditional
distribution almost a point mass, which is what lets a small UNet sample it in 1-4 steps.

Scenes are sampled with numpy from a seed (never stored); `render` draws them with torch on any
device, so training renders its batches on the GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.08),
    "yellow": (0.96, 0.88, 0.15),
    "green": (0.15, 0.62, 0.20),
    "blue": (0.12, 0.30, 0.90),
    "purple": (0.55, 0.20, 0.70),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: dict[str, float] = {"small": 0.08, "large": 0.13}  # radius as a fraction of the image side
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre as fractions of the side, y down
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
MAX_OBJECTS = 3
OBJECT_COUNT_PROBS = (0.35, 0.40, 0.25)  # P(1), P(2), P(3) objects
POSITION_JITTER = 0.012  # fraction of the side
RADIUS_JITTER = 0.03  # relative
# Shape extents relative to the radius r: a square of equal area to the circle, and a triangle
# whose circumradius is 1.2 r (an equal-area triangle would not fit beside its neighbours).
SQUARE_HALF_SIDE = 0.886
TRIANGLE_CIRCUMRADIUS = 1.2


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    """Ground-truth attributes of one image; `caption()` is the text the model is trained on."""

    objects: tuple[SceneObject, ...]
    background: str

    def caption(self) -> str:
        phrases = [o.phrase() for o in self.objects]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        article = "an" if self.background[0] in "aeiou" else "a"
        return f"{body}, on {article} {self.background} background"

    def canonical(self) -> tuple:
        """Order-free form, for comparing two scenes."""
        return (self.background, tuple(sorted((o.position, o.shape, o.color, o.size) for o in self.objects)))


_OBJECT_RE = re.compile(
    r"a (%s) (%s) (%s) (%s)"
    % ("|".join(SIZE_NAMES), "|".join(COLOR_NAMES), "|".join(SHAPES), "|".join(POSITION_PHRASES.values()))
)
_BACKGROUND_RE = re.compile(r"on an? (%s) background" % "|".join(COLOR_NAMES))


def parse_caption(caption: str) -> Scene:
    """Recover the attributes from a caption written in the generator's language."""
    text = " ".join(caption.lower().split())
    background = _BACKGROUND_RE.search(text)
    objects = _OBJECT_RE.findall(text)
    if background is None or not objects:
        raise ValueError(
            f"caption {caption!r} is not in the tiny dataset's language; expected e.g. "
            f"{example_scene().caption()!r}"
        )
    phrase_to_position = {v: k for k, v in POSITION_PHRASES.items()}
    return Scene(
        objects=tuple(SceneObject(shape, color, size, phrase_to_position[pos]) for size, color, shape, pos in objects),
        background=background.group(1),
    )


def example_scene() -> Scene:
    return Scene((SceneObject("circle", "red", "large", "center"),), "white")


@dataclass
class SceneBatch:
    """Scenes plus the numeric layout (with jitter) that `render` draws."""

    scenes: list[Scene]
    shape: np.ndarray  # (B, MAX_OBJECTS) int, -1 where no object
    color: np.ndarray  # (B, MAX_OBJECTS, 3) float RGB in [0, 1]
    center: np.ndarray  # (B, MAX_OBJECTS, 2) float (x, y) fractions of the side
    radius: np.ndarray  # (B, MAX_OBJECTS) float fraction of the side
    background: np.ndarray  # (B, 3) float RGB

    def captions(self) -> list[str]:
        return [s.caption() for s in self.scenes]


def sample_scenes(n: int, rng: np.random.Generator, object_counts: tuple[int, ...] | None = None) -> SceneBatch:
    """Draw `n` random scenes. `object_counts` restricts how many objects a scene may have."""
    counts = np.array(object_counts or (1, 2, 3))
    probs = np.array([OBJECT_COUNT_PROBS[c - 1] for c in counts])
    scenes = []
    for _ in range(n):
        k = int(rng.choice(counts, p=probs / probs.sum()))
        colors = rng.choice(len(COLOR_NAMES), size=k + 1, replace=False)  # last one is the background
        positions = rng.choice(len(POSITION_NAMES), size=k, replace=False)
        objects = tuple(
            SceneObject(
                shape=SHAPES[rng.integers(len(SHAPES))],
                color=COLOR_NAMES[colors[i]],
                size=SIZE_NAMES[rng.integers(len(SIZE_NAMES))],
                position=POSITION_NAMES[positions[i]],
            )
            for i in range(k)
        )
        scenes.append(Scene(objects, COLOR_NAMES[colors[k]]))
    return layout(scenes, rng)


def layout(scenes: list[Scene], rng: np.random.Generator | None = None) -> SceneBatch:
    """Numeric layout of given scenes; jitter comes from `rng` (None = no jitter)."""
    n = len(scenes)
    shape = np.full((n, MAX_OBJECTS), -1, dtype=np.int64)
    color = np.zeros((n, MAX_OBJECTS, 3), dtype=np.float32)
    center = np.full((n, MAX_OBJECTS, 2), 0.5, dtype=np.float32)
    radius = np.full((n, MAX_OBJECTS), 0.1, dtype=np.float32)
    for b, scene in enumerate(scenes):
        for i, obj in enumerate(scene.objects):
            shape[b, i] = SHAPES.index(obj.shape)
            color[b, i] = COLORS[obj.color]
            center[b, i] = POSITIONS[obj.position]
            radius[b, i] = SIZES[obj.size]
    if rng is not None:
        center += rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=center.shape).astype(np.float32)
        radius *= 1 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER, size=radius.shape).astype(np.float32)
    background = np.array([COLORS[s.background] for s in scenes], dtype=np.float32).reshape(n, 3)
    return SceneBatch(scenes, shape, color, center, radius, background)


def shape_alpha(shape: torch.Tensor, center: torch.Tensor, radius: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased coverage (..., size, size) in [0, 1] of shapes given by index, centre and radius.

    shape: (...) int (-1 = nothing), center: (..., 2) fractions, radius: (...) fraction.
    """
    coords = (torch.arange(size, device=center.device, dtype=torch.float32) + 0.5) / size
    x = coords.view(1, -1) - center[..., 0, None, None]
    y = coords.view(-1, 1) - center[..., 1, None, None]
    r = radius[..., None, None]
    circle = torch.sqrt(x * x + y * y) - r
    square = torch.maximum(x.abs(), y.abs()) - SQUARE_HALF_SIDE * r
    # Upward equilateral triangle: three half-planes at the inradius (R/2) from the centre.
    c30 = 0.8660254
    triangle = torch.maximum(torch.maximum(y, -c30 * x - 0.5 * y), c30 * x - 0.5 * y) - 0.5 * TRIANGLE_CIRCUMRADIUS * r
    s = shape[..., None, None]
    sdf = torch.where(s == 0, circle, torch.where(s == 1, square, triangle))
    alpha = (0.5 - sdf * size).clamp(0.0, 1.0)
    return torch.where(s >= 0, alpha, torch.zeros_like(alpha))


def render(batch: SceneBatch, size: int = 128, device: torch.device | str = "cpu") -> torch.Tensor:
    """Images (B, 3, size, size) float32 in [0, 1]."""
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    alpha = shape_alpha(t(batch.shape), t(batch.center), t(batch.radius), size)  # (B, K, H, W)
    image = t(batch.background)[:, :, None, None].expand(-1, -1, size, size)
    for k in range(MAX_OBJECTS):  # objects never overlap, so the order does not matter
        a = alpha[:, k, None]
        image = image * (1 - a) + t(batch.color)[:, k, :, None, None] * a
    return image.contiguous()


def caption_vocabulary() -> list[str]:
    """Every word of the caption language (for the tokenizers' merges)."""
    words = {"a", "an", "and", "on", "background"}
    words.update(SHAPES, COLOR_NAMES, SIZE_NAMES)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)
