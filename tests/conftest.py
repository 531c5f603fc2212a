"""Shared fixtures. Tests run on CPU, offline; Triton kernels run in its interpreter."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
