"""Procedural captioned scenes for the embedded tiny model.

Every image is 1-3 flat shapes on a plain background. Its full caption names every attribute
(shape, colour, size, position, background), so the caption fixes the image up to a few pixels
of jitter. That makes text alignment exactly measurable, and makes the conditional
distribution almost a point mass, which is what lets a small UNet sample it in 1-4 steps.

People type short prompts ("a red circle"), so training also uses partial captions: `describe`
drops any of size, position and background, and `write_caption` words the result in one of several
phrasings and synonyms. What the image shows for an attribute the caption leaves open is a choice
(`OPEN_ATTRIBUTES`): drawn at random, or a fixed default (`complete`: large, in the canonical places,
on white). Defaults keep every caption's image a near point mass; random ones make the short
caption's image a distribution whose mean (a blur of every place and size) is what a few-step
sampler of a non-distilled model tends to draw. A partial `Scene` has None for each attribute its
caption leaves open; `Scene.matches` compares it with a full one.

Scenes are sampled with numpy from a seed (never stored); `render` draws them with torch on any
device, so training renders its batches on the GPU.
"""

from __future__ import annotations

import itertools
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
# Phrasings; the first of each is the canonical one (`Scene.caption`). Words outside
# `caption_vocabulary()` (disc, box, big, side, middle) are not single tokens of the shipped tokenizer:
# its byte-level BPE splits them into pieces it has ids for (never an unknown token), so a UNet
# fine-tune learns them with the shipped tokenizer and text encoders unchanged.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small",), "large": ("large", "big")}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "at the left", "left"),
    "right": ("on the right", "on the right side", "at the right", "right"),
    "top": ("at the top", "on the top", "top"),
    "bottom": ("at the bottom", "on the bottom", "bottom"),
    "center": ("in the center", "at the center", "in the middle", "center"),
}
POSITION_PHRASES: dict[str, str] = {p: words[0] for p, words in POSITION_WORDS.items()}
BACKGROUND_FORMS = ("on {article} {color} background", "{color} background", "on {color}")
KEEP_PROB = 0.5  # chance that a partial caption keeps each of size, position and background
MAX_OBJECTS = 3
OBJECT_COUNT_PROBS = (0.35, 0.40, 0.25)  # P(1), P(2), P(3) objects
POSITION_JITTER = 0.012  # fraction of the side
RADIUS_JITTER = 0.03  # relative
# Shape extents relative to the radius r: a square of equal area to the circle, and a triangle
# whose circumradius is 1.2 r (an equal-area triangle would not fit beside its neighbours).
SQUARE_HALF_SIDE = 0.886
TRIANGLE_CIRCUMRADIUS = 1.2


OPEN_ATTRIBUTES = ("default", "random")  # what the training image shows where the caption is silent
DEFAULT_SIZE = "large"
DEFAULT_BACKGROUNDS = ("white", "black", "yellow", "blue")  # the first one no object uses
DEFAULT_POSITIONS: dict[int, tuple[str, ...]] = {  # by object count; open objects take the first free place
    1: ("center", "left", "right", "top", "bottom"),
    2: ("left", "right", "center", "top", "bottom"),
    3: ("left", "center", "right", "top", "bottom"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class SceneObject:
    """One shape; size or position None = the caption leaves it open."""

    shape: str
    color: str
    size: str | None
    position: str | None

    def phrase(self) -> str:
        words = [w for w in (self.size, self.color, self.shape) if w is not None]
        position = [POSITION_PHRASES[self.position]] if self.position is not None else []
        return " ".join([_article(words[0])] + words + position)

    def matches(self, detected: SceneObject) -> bool:
        """Does `detected` have every attribute this object names?"""
        named = [(a, b) for a, b in zip(self._attributes(), detected._attributes()) if a is not None]
        return all(a == b for a, b in named)

    def _attributes(self) -> tuple[str | None, ...]:
        return (self.shape, self.color, self.size, self.position)


@dataclass(frozen=True)
class Scene:
    """Attributes of one image (all set: ground truth) or of a caption (None = left open).
    `caption()` is the canonical text for them."""

    objects: tuple[SceneObject, ...]
    background: str | None

    def caption(self) -> str:
        phrases = [o.phrase() for o in self.objects]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        if self.background is None:
            return body
        return f"{body}, on {_article(self.background)} {self.background} background"

    def canonical(self) -> tuple:
        """Order-free form, for comparing two scenes."""
        key = lambda o: tuple(a or "" for a in (o.position, o.shape, o.color, o.size))
        return (self.background, tuple(sorted(key(o) for o in self.objects)))

    def is_partial(self) -> bool:
        return self.background is None or any(o.size is None or o.position is None for o in self.objects)

    def matches(self, detected: Scene) -> bool:
        """Does the full scene `detected` show every attribute this one names, and no extra object?"""
        if self.background is not None and self.background != detected.background:
            return False
        if len(self.objects) != len(detected.objects):
            return False
        return any(
            all(e.matches(d) for e, d in zip(self.objects, order)) for order in itertools.permutations(detected.objects)
        )


def describe(scene: Scene, rng: np.random.Generator, keep_prob: float = KEEP_PROB) -> Scene:
    """A partial description of `scene`: each size, position and the background kept with `keep_prob`."""
    keep = lambda value: value if rng.random() < keep_prob else None
    objects = tuple(SceneObject(o.shape, o.color, keep(o.size), keep(o.position)) for o in scene.objects)
    return Scene(objects, keep(scene.background))


def write_caption(scene: Scene, rng: np.random.Generator) -> str:
    """`scene` (full or partial) in a random phrasing: synonyms, article or none, joiner, and the
    background (if named) in one of its forms, before or after the objects."""
    use_article = rng.random() < 0.75
    phrases = []
    for o in scene.objects:
        words = [str(rng.choice(SIZE_WORDS[o.size]))] if o.size is not None else []
        words += [o.color, str(rng.choice(SHAPE_WORDS[o.shape]))]
        if o.position is not None:
            words.append(str(rng.choice(POSITION_WORDS[o.position])))
        phrases.append(" ".join(([_article(words[0])] if use_article else []) + words))
    if len(phrases) > 1 and rng.random() < 0.5:
        body = " and ".join(phrases)
    else:
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if scene.background is None:
        return body
    form = str(rng.choice(BACKGROUND_FORMS))
    background = form.format(article=_article(scene.background), color=scene.background)
    if rng.random() < 0.25:
        return f"{background}, {body}"
    return f"{body} {background}" if form.startswith("on") and rng.random() < 0.5 else f"{body}, {background}"


def caption_mix(scenes: list[Scene], rng: np.random.Generator, full_share: float) -> list[str]:
    """Training captions: the canonical full caption with probability `full_share`, otherwise a
    partial description of the scene in a random phrasing."""
    return training_pairs(scenes, rng, full_share, "random")[1]


def complete(described: Scene) -> Scene:
    """The full scene a partial description stands for under the default rule: open sizes large,
    open positions the first free ones of `DEFAULT_POSITIONS` (in caption order), an open background
    the first of `DEFAULT_BACKGROUNDS` that no object uses. A full scene is returned unchanged."""
    named = {o.position for o in described.objects if o.position is not None}
    free = iter(p for p in DEFAULT_POSITIONS[len(described.objects)] if p not in named)
    objects = tuple(
        SceneObject(o.shape, o.color, o.size or DEFAULT_SIZE, o.position or next(free)) for o in described.objects
    )
    used = {o.color for o in described.objects}
    background = described.background or next(c for c in DEFAULT_BACKGROUNDS if c not in used)
    return Scene(objects, background)


def training_pairs(
    scenes: list[Scene], rng: np.random.Generator, full_share: float, open_attributes: str = "random"
) -> tuple[list[Scene], list[str]]:
    """The scenes to draw and their training captions: the canonical full caption with probability
    `full_share`, otherwise a partial description in a random phrasing. Its image is the scene as
    drawn ("random": the open attributes keep their random values) or the description `complete`d
    ("default": the image shows the defaults for what its caption leaves open)."""
    if open_attributes not in OPEN_ATTRIBUTES:
        raise ValueError(f"open_attributes must be one of {OPEN_ATTRIBUTES}, got {open_attributes!r}")
    drawn, captions = [], []
    for s in scenes:
        if rng.random() < full_share:
            drawn.append(s)
            captions.append(s.caption())
            continue
        d = describe(s, rng)
        drawn.append(complete(d) if open_attributes == "default" else s)
        captions.append(write_caption(d, rng))
    return drawn, captions


def partial_captions(scenes: list[Scene], rng: np.random.Generator) -> tuple[list[Scene], list[str]]:
    """Descriptions that each leave at least one attribute open, and their random phrasings (evaluation)."""
    described = []
    for scene in scenes:
        d = describe(scene, rng)
        while not d.is_partial():
            d = describe(scene, rng)
        described.append(d)
    return described, [write_caption(d, rng) for d in described]


def _alternatives(words) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))  # longest first: "left side" before "left"


def _inverse(words: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {w: name for name, ws in words.items() for w in ws}


_SHAPE_OF, _SIZE_OF, _POSITION_OF = _inverse(SHAPE_WORDS), _inverse(SIZE_WORDS), _inverse(POSITION_WORDS)
_COLOR = _alternatives(COLOR_NAMES)
_OBJECT_RE = re.compile(
    rf"(?:an? )?(?:({_alternatives(_SIZE_OF)}) )?({_COLOR}) ({_alternatives(_SHAPE_OF)})(?: ({_alternatives(_POSITION_OF)}))?"
)
_BACKGROUND = rf"on (?:an? )?(?P<on>{_COLOR})(?: background)?|(?P<bare>{_COLOR}) background"
_LEADING_BACKGROUND_RE = re.compile(rf"(?:{_BACKGROUND})(?: ,)? (?P<rest>.+)")
_TRAILING_BACKGROUND_RE = re.compile(rf"(?P<rest>.+?)(?: ,)? (?:{_BACKGROUND})")
_OBJECT_SEPARATOR_RE = re.compile(r" (?:, and|,|and) ")


def parse_caption(caption: str) -> Scene:
    """Recover the attributes a caption names (None where it leaves one open); it must be written
    in the generator's language, in any of `write_caption`'s phrasings."""
    text = " ".join(caption.lower().strip().removesuffix(".").replace(",", " , ").split())
    background = None
    for pattern in (_LEADING_BACKGROUND_RE, _TRAILING_BACKGROUND_RE):
        m = pattern.fullmatch(text)
        if m is not None:
            background, text = m.group("on") or m.group("bare"), m.group("rest")
            break
    matches = [_OBJECT_RE.fullmatch(part) for part in _OBJECT_SEPARATOR_RE.split(text)]
    if not all(matches):
        raise ValueError(
            f"caption {caption!r} is not in the tiny dataset's language; expected e.g. "
            f"{example_scene().caption()!r} or a part of it, such as 'a red circle'"
        )
    objects = tuple(
        SceneObject(_SHAPE_OF[shape], color, _SIZE_OF.get(size), _POSITION_OF.get(position))
        for size, color, shape, position in (m.groups() for m in matches)
    )
    _check_drawable(caption, Scene(objects, background))
    return Scene(objects, background)


def _check_drawable(caption: str, scene: Scene) -> None:
    """The scene language's limits: 1-3 objects, every colour once, every position once."""
    if len(scene.objects) > MAX_OBJECTS:
        raise ValueError(
            f"caption {caption!r} names {len(scene.objects)} objects; the tiny model draws 1 to {MAX_OBJECTS}"
        )
    colors = [o.color for o in scene.objects] + ([scene.background] if scene.background else [])
    positions = [o.position for o in scene.objects if o.position is not None]
    for kind, values, rule in (
        ("colour", colors, "the objects and the background each have their own colour"),
        ("position", positions, "each object has its own position"),
    ):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(
                f"caption {caption!r} names the {kind} {repeated[0]!r} twice; in the tiny model's scenes {rule}"
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
    t = lambda a: torch.as_tensor(a, device=device)
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
