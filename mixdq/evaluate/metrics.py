"""Image-quality metrics for comparing quantized generations against the FP generations.

Two kinds, so a table can be made on any machine:

* no pretrained network: :func:`ssim` and :func:`psnr` of each quantized image against the FP image made
  from the same prompt and noise;
* a CLIP model (:class:`ClipScorer`; :class:`OpenClipScorer` wraps any open_clip model, e.g. the embedded
  model's own tiny CLIP): :func:`clip_score` for text alignment and :func:`frechet_distance` between CLIP
  image features of the quantized and the FP image sets.

Inception FID (:func:`inception_fid_metric`) needs torch-fidelity and the FID Inception weights on disk; it
never downloads, and says so in one sentence when either is missing.

Images everywhere are float ``(N, 3, H, W)`` tensors in [0, 1], as ``pipe(..., output_type="pt")`` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mixdq.sensitivity.sweep import image_ssims

# The weights torch-fidelity's FID Inception network loads (pytorch-fid's port of the TF FID graph).
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FEATURES = 2048


class MetricUnavailableError(RuntimeError):
    """A metric cannot be computed on this machine (a missing package or missing weights); the message says which."""


def _check_pair(reference: torch.Tensor, test: torch.Tensor) -> None:
    if reference.shape != test.shape or reference.ndim != 4 or reference.shape[1] != 3:
        raise ValueError(
            "expected two image batches of the same shape (N, 3, H, W); "
            f"got {tuple(reference.shape)} and {tuple(test.shape)}."
        )


def ssim(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, shape (N,), with the sensitivity sweep's settings (Gaussian window 11×11, σ = 1.5,
    data range 1, on RGB), so evaluation and the content-layer sensitivities measure the same thing.
    Float rounding can push identical images a hair above 1; values are clipped to 1."""
    _check_pair(reference, test)
    return image_ssims(reference, test).clamp(max=1.0)


def psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB, data range 1, of the mean squared error over the whole batch.

    Pooling the error before the log keeps one unchanged image from making the result infinite; the result
    is ``math.inf`` exactly when every pixel of every image is identical (e.g. the FP row against itself).
    """
    _check_pair(reference, test)
    return psnr_from_mse((test.double() - reference.double()).pow(2).mean().item())


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for data range 1; ``math.inf`` for a zero error (identical images) rather than a division error."""
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets, each (N, D) with N ≥ 2:
    ``‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa Σb)^½``.

    The cross term uses ``tr (Σa Σb)^½ = tr (Σa^½ Σb Σa^½)^½``: both square roots are of symmetric PSD
    matrices and come from ``eigh`` in float64, so no complex values ever appear (scipy's ``sqrtm`` of the
    non-symmetric product needs imaginary parts dropped) and singular covariances (N ≤ D, usual for small
    prompt sets) need no ε on the diagonal. Rounding can make tiny eigenvalues negative: they are clamped to 0,
    and the result to ≥ 0. Note the estimate is biased upwards for small N; compare configs at equal N.
    """
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"{name}: need an (N, D) feature matrix with N ≥ 2, got shape {tuple(features.shape)}.")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_a.shape[1]} vs {features_b.shape[1]}.")
    a, b = features_a.double().cpu(), features_b.double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(0.0, distance.item())


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative rounding eigenvalues clamped to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


@runtime_checkable
class ClipScorer(Protocol):
    """A CLIP-like model: image and text embeddings in one space. Any object with these two methods plugs in."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D) image embeddings."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings -> (N, D) text embeddings."""
        ...


def cosine_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score, shape (N,): 100 × cosine similarity of row i of each, torchmetrics' CLIPScore scale
    (the paper's 0.2722 is the same number / 100) but without its clamp at 0, so a model that anti-aligns
    shows as negative rather than as a flat 0."""
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"one text per image needed: image features {tuple(image_features.shape)}, "
            f"text features {tuple(text_features.shape)}."
        )
    return 100 * F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)


def clip_score(scorer: ClipScorer, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Per-image CLIP score (see :func:`cosine_score`) of ``images[i]`` against ``texts[i]``."""
    if len(texts) != len(images):
        raise ValueError(f"one text per image needed: {len(images)} images, {len(texts)} texts.")
    return cosine_score(scorer.encode_images(images), scorer.encode_texts(list(texts)))


class OpenClipScorer:
    """:class:`ClipScorer` over an open_clip model.

    ``preprocess`` and ``tokenizer`` are what open_clip hands out with the model
    (``create_model_and_transforms`` / ``get_tokenizer``, or :func:`mixdq.tiny.clip.load_tiny_clip`): the
    preprocess takes PIL images, so each image goes through uint8 PIL exactly as open_clip's own evaluation
    feeds it, and scores match what open_clip users measure. Embeddings come back on the CPU, in float32.
    """

    def __init__(
        self, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Callable
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(to_pil(image)) for image in images]).to(self.device)
        return self.model.encode_image(pixels).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float().cpu()


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL image (rounded to uint8, as a saved PNG would be)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def inception_fid_metric(weights_path: str | Path | None = None) -> Any:
    """torchmetrics' ``FrechetInceptionDistance`` (2048-d pool features, inputs in [0, 1]) loading the FID Inception
    weights from ``weights_path`` (default: ``<torch hub dir>/checkpoints/pt_inception-2015-12-05-6726825d.pth``,
    where torch-fidelity would have cached them). Raises :class:`MetricUnavailableError` instead of downloading.

    Real features stay across ``reset()`` (``reset_real_features=False``): add the FP images once as real, then per
    config ``reset()``, add its images as fake, ``compute()``.
    """
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' FID network comes from it)
    except ImportError:
        raise MetricUnavailableError(
            "Inception FID needs the torch-fidelity package, which is not installed (pip install torch-fidelity)."
        ) from None
    path = (
        Path(weights_path)
        if weights_path is not None
        else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    )
    if not path.is_file():
        raise MetricUnavailableError(
            f"Inception FID needs the FID Inception weights at {path}, which is missing; copy {INCEPTION_WEIGHTS_FILE} "
            "there or pass its path (nothing is downloaded)."
        )
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(
        feature=INCEPTION_FEATURES, normalize=True, reset_real_features=False, feature_extractor_weights_path=str(path)
    )
