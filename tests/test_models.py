"""Pipeline loading: local folders and hub ids go through from_pretrained; failures say what to do."""

import pytest
import torch

from mixdq.models import TURBO_SAMPLING, ModelNotAvailableError, load_pipeline


def test_local_folder_round_trip(random_pipe, tmp_path):
    random_pipe.save_pretrained(tmp_path / "pipe")
    pipe = load_pipeline(tmp_path / "pipe", device="cpu")
    assert pipe.model_id == str(tmp_path / "pipe")
    assert pipe.unet.dtype == torch.float32
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert sched.timestep_spacing == "trailing"
    generator = torch.Generator().manual_seed(0)
    image = pipe(
        "a red circle",
        num_inference_steps=TURBO_SAMPLING.num_inference_steps,
        guidance_scale=TURBO_SAMPLING.guidance_scale,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)


def test_missing_hub_model_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as err:
        load_pipeline("stabilityai/sdxl-turbo", device="cpu")
    message = str(err.value)
    assert "not available offline" in message and "huggingface-cli download stabilityai/sdxl-turbo" in message
    assert message.count("\n") == 0


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="not a diffusers StableDiffusionXLPipeline folder"):
        load_pipeline(tmp_path / "empty", device="cpu")
