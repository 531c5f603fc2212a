"""Regional compilation (mixdq.deploy.compile): copies of a repeated block share one compiled graph, deployed too.

A deployed layer's activation quantizers differ from layer to layer. Read as Python numbers, Dynamo guarded
on them, so every copy of a block compiled on its own (and past the recompile limit ran eagerly); read from
tensors, one compiled graph serves them all.
"""

import os

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from mixdq.deploy import deploy_layer
from mixdq.deploy.compile import compile_repeated_blocks
from tests.test_deploy import fake_quant_layer


class Block(nn.Module):
    """A stand-in for a transformer block: an A8 linear, a BOS-aware K projection and a quantized 3x3 conv."""

    def __init__(self, x: torch.Tensor, context: torch.Tensor, img: torch.Tensor, gain: float, backend: str) -> None:
        super().__init__()
        torch.manual_seed(int(gain))
        self.proj = deploy_layer(fake_quant_layer(nn.Linear(32, 32), 8, 8, gain * x))
        scaled = torch.cat([context[:, :1], gain * context[:, 1:]], 1)  # the same BOS token, other ranges
        self.to_k = deploy_layer(fake_quant_layer(nn.Linear(24, 32), 4, 8, scaled, bos_aware=True))
        self.conv = deploy_layer(fake_quant_layer(nn.Conv2d(8, 8, 3, padding=1), 4, 8, gain * img))
        self.proj.layer_name, self.to_k.layer_name = f"block{gain}.proj", f"block{gain}.to_k"
        for layer in (self.proj, self.to_k):
            layer.backend = backend

    def forward(self, x: torch.Tensor, context: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x) + self.to_k(context).mean(1, keepdim=True), self.conv(img)


BACKENDS = ["torch"]
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    BACKENDS.append("triton")


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_copies_of_a_deployed_block_share_one_compiled_graph(backend):
    torch.manual_seed(0)
    x, context, img = torch.randn(2, 5, 32), torch.randn(2, 6, 24), torch.randn(1, 8, 6, 6)
    blocks = nn.ModuleList(Block(x, context, img, gain, backend) for gain in (1.0, 3.0, 7.0))
    for layer in ("proj", "to_k", "conv"):  # three different quantizers each
        assert len({b.get_submodule(layer).act_kwargs["act_scale"] for b in blocks}) == 3
    eager = [block(x, context, img) for block in blocks]
    torch._dynamo.reset()
    counters.clear()
    assert compile_repeated_blocks(blocks, ("Block",), backend="aot_eager", fullgraph=True) == 3
    compiled = [block(x, context, img) for block in blocks]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for e, c in zip(eager, compiled, strict=True):
        for a, b in zip(e, c, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * float(a.abs().max()))


def test_compile_repeated_blocks_raises_the_recompile_limit_to_the_block_count():
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4)) for _ in range(12)])
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=8):
        assert compile_repeated_blocks(blocks, ("Linear",)) == 12
        assert torch._dynamo.config.recompile_limit == 12
        assert torch._dynamo.config.accumulated_recompile_limit == 12


def test_a_model_without_the_blocks_is_refused():
    with pytest.raises(ValueError, match="no BasicTransformerBlock / ResnetBlock2D in this model"):
        compile_repeated_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_a_pipeline_compiles_its_unets_blocks(random_pipe):
    import copy
    import types

    unet = copy.deepcopy(random_pipe.unet)
    n = compile_repeated_blocks(types.SimpleNamespace(unet=unet))
    kinds = [type(m).__name__ for m in unet.modules()]
    assert n == kinds.count("BasicTransformerBlock") + kinds.count("ResnetBlock2D") > 0
    with pytest.raises(TypeError, match="pipeline or a UNet"):
        compile_repeated_blocks("unet")


def test_a_block_inside_a_chosen_block_is_compiled_with_it():
    outer = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    compiled = compile_repeated_blocks(nn.Sequential(outer, nn.Linear(2, 2)), ("Sequential",))
    assert compiled == 1  # `outer` only: the model itself is no region, and what is inside outer compiles with it
