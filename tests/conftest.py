"""Shared fixtures. Tests run on CPU, offline; Triton kernels run in its interpreter."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Whether a GPU is usable, not whether one is named (CUDA_VISIBLE_DEVICES=0 on a machine without one): set before
# any test module imports triton or kernels, whose @triton.jit reads it. torch.cuda.is_available() asks the driver
# without creating a CUDA context and does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def random_pipe():
    """The config-built SDXL-architecture pipeline with random weights (shared; do not mutate its UNet)."""
    from mixdq.models import build_random_pipeline

    return build_random_pipeline(seed=0)


@pytest.fixture()
def fresh_random_pipe():
    """A private copy of the random pipeline, for tests that quantize its UNet in place."""
    from mixdq.models import build_random_pipeline

    return build_random_pipeline(seed=0)
