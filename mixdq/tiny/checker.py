"""Rule-based alignment checker: reads the scene back from an image and compares it with the caption.

Why rules and not a classifier: the scene language is closed and the layout slots are fixed, so
nearest-palette colour labels plus template matching read a rendered image exactly, and stay
robust on blurry generated images (no trained weights to ship or to drift).

A caption may leave attributes open (a partial `Scene`); only those it names are compared.

Steps: background = the palette colour most common on the image border; foreground = pixels of
another palette colour; each foreground pixel goes to its nearest position slot; a slot with
enough pixels holds an object whose colour is the majority label and whose shape and size are
those of the best-matching (IoU) rendered template at the blob's centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mixdq.tiny.data import (
    COLOR_NAMES,
    COLORS,
    POSITION_NAMES,
    POSITIONS,
    SHAPES,
    SIZE_NAMES,
    SIZES,
    Scene,
    SceneObject,
    parse_caption,
    shape_alpha,
)

BORDER_FRACTION = 1 / 32
MIN_OBJECT_AREA = 0.004  # fraction of the image; a small triangle covers ~0.012

_PALETTE = torch.tensor([COLORS[c] for c in COLOR_NAMES])  # (C, 3)
_SLOTS = torch.tensor([POSITIONS[p] for p in POSITION_NAMES])  # (P, 2)


@dataclass(frozen=True)
class CheckResult:
    correct: bool  # every attribute the caption names right, and no extra object
    expected: Scene
    detected: Scene


def _as_tensor(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 / float array or (3, H, W) float tensor in [0, 1] -> (3, H, W) float."""
    t = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if t.ndim != 3:
        raise ValueError(f"expected one image with 3 dims, got shape {tuple(t.shape)}")
    if t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    t = t.float().cpu()
    return t / 255.0 if t.max() > 1.5 else t


def detect(image: torch.Tensor | np.ndarray) -> Scene:
    """Read the scene (objects per slot, background) out of one square RGB image."""
    img = _as_tensor(image)
    size = img.shape[-1]
    labels = torch.cdist(img.permute(1, 2, 0).reshape(-1, 3), _PALETTE).argmin(1).view(size, size)
    b = max(1, round(size * BORDER_FRACTION))
    border = torch.cat([labels[:b].flatten(), labels[-b:].flatten(), labels[:, :b].flatten(), labels[:, -b:].flatten()])
    background = int(border.mode().values)
    # A foreground pixel needs mostly-foreground neighbours: isolated noise pixels are not objects.
    fg = labels != background
    fg = fg & (F.avg_pool2d(fg[None].float(), 3, 1, 1, count_include_pad=False)[0] > 0.5)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([xx, yy], -1)  # (H, W, 2)
    slot = torch.cdist(points.view(-1, 2), _SLOTS).argmin(1).view(size, size)

    objects = []
    for p, position in enumerate(POSITION_NAMES):
        mask = fg & (slot == p)
        if mask.sum() < MIN_OBJECT_AREA * size * size:
            continue
        color = COLOR_NAMES[int(labels[mask].mode().values)]
        centroid = points[mask].mean(0)
        shape, size_name = _match_template(mask, centroid, size)
        objects.append(SceneObject(shape, color, size_name, position))
    return Scene(tuple(objects), COLOR_NAMES[background])


def _match_template(mask: torch.Tensor, centroid: torch.Tensor, size: int) -> tuple[str, str]:
    """(shape, size name) of the rendered template with the highest IoU against the mask."""
    shapes = torch.tensor([s for s in range(len(SHAPES)) for _ in SIZE_NAMES])
    radii = torch.tensor([SIZES[z] for _ in SHAPES for z in SIZE_NAMES])
    # A triangle's area centroid is its circumcentre, so every template is centred on the centroid.
    templates = shape_alpha(shapes, centroid.expand(len(shapes), 2), radii, size) > 0.5
    inter = (templates & mask).sum((1, 2)).float()
    union = (templates | mask).sum((1, 2)).float()
    best = int((inter / union).argmax())
    return SHAPES[int(shapes[best])], SIZE_NAMES[best % len(SIZE_NAMES)]


def check(image: torch.Tensor | np.ndarray, caption: str | Scene) -> CheckResult:
    """Does the image show what the caption says? Only the attributes it names are scored: "a red
    circle" is right for any size, place and background, but not beside a second object."""
    expected = parse_caption(caption) if isinstance(caption, str) else caption
    detected = detect(image)
    return CheckResult(expected.matches(detected), expected, detected)
