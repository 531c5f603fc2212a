"""mixdq.deploy.unpack_groups: a block's 4- / 2-bit linears (FP8, or on the dequant path) unpacked in one launch make
the same images.

On CPU the grouped kernel runs in Triton's interpreter (tests/conftest.py): the kernel tests and the one-block
tests switch the layers to the Triton backend, so what is compared is the kernel the GPU runs, against the
per-layer unpacking; the whole-pipeline tests check the hooks on the PyTorch path (the same numbers).
"""

import pytest
import torch

import kernels.unpack
from kernels import PackedWeight, reference
from mixdq.config import PrecisionConfig
from mixdq.deploy import deploy
from mixdq.deploy.fuse import fuse_qkv_projections
from mixdq.deploy.unpack_groups import block_members, group_unpacking, grouped_blocks, ungroup_unpacking
from mixdq.inventory import layer_inventory
from tests.test_deploy import generate
from tests.test_fuse import calibrated_copy

triton = pytest.importorskip("triton", reason="triton is not installed: the grouped kernel needs it")


def packed(n: int, k: int, bits: int, seed: int) -> PackedWeight:
    q, s = reference.quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), bits)
    return PackedWeight.from_codes(q, s, bits)


@pytest.mark.parametrize("slots", [8, 2])
def test_grouped_kernel_writes_every_weights_codes_bit_for_bit(monkeypatch, slots):
    """Several weights of both bit widths, sizes off the tile and chunk sizes, one launch (or several when
    they outnumber the kernel's slots): each slice is that weight's e4m3 codes, bit for bit."""
    monkeypatch.setattr(kernels.unpack, "GROUP_SLOTS", slots)
    weights = [packed(n, k, bits, seed) for seed, (n, k, bits) in enumerate([(40, 75, 4), (33, 300, 2), (70, 128, 4)])]
    launches = []
    launch = kernels.unpack.unpack_group_kernel.run
    monkeypatch.setattr(
        kernels.unpack.unpack_group_kernel, "run", lambda *a, **kw: launches.append(1) or launch(*a, **kw)
    )

    flat = PackedWeight.codes_fp8_group(weights, backend="triton")

    assert len(launches) == -(-len(weights) // slots)
    assert flat.dtype == torch.float8_e4m3fn and flat.shape == (sum(w.out_features * w.in_features for w in weights),)
    expected = PackedWeight.codes_fp8_group(weights, backend="torch")
    assert torch.equal(flat.view(torch.uint8), expected.view(torch.uint8))
    start = 0
    for w in weights:
        size = w.out_features * w.in_features
        assert torch.equal(flat[start : start + size].view(w.out_features, -1).float(), w.codes().float())
        start += size


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_grouped_kernel_dequantizes_like_the_per_layer_kernel(dtype):
    """The dequant paths' grouped weights: each slice equals that weight's per-layer unpacking (Triton and
    PyTorch), bit for bit."""
    weights = [packed(n, k, bits, seed) for seed, (n, k, bits) in enumerate([(33, 300, 2), (40, 75, 4)])]
    flat = PackedWeight.dequantize_group(weights, dtype, backend="triton")
    assert flat.dtype == dtype
    assert torch.equal(flat, PackedWeight.dequantize_group(weights, dtype, backend="torch"))
    assert torch.equal(flat, torch.cat([w.dequantize(dtype, backend="triton").flatten() for w in weights]))


def test_grouped_kernel_refuses_what_it_cannot_unpack():
    with pytest.raises(ValueError, match="without a k_split"):
        q, s = reference.quantize_weight(torch.randn(8, 64), 4, k_split=32)
        PackedWeight.codes_fp8_group([PackedWeight.from_codes(q, s, 4, k_split=32)], backend="triton")
    with pytest.raises(ValueError, match="4- or 2-bit"):
        kernels.unpack.unpack_group([packed(8, 64, 4, 0).data], None, [8], [64], torch.float8_e4m3fn)


# what each kind of grouped layer unpacks per call on its own, and what the grouped unpacking calls instead
KINDS = {"fp8": ("codes_fp8", "codes_fp8_group"), "dequant": ("dequantize", "dequantize_group")}


@pytest.fixture(params=list(KINDS))
def kind_pipe(request, random_pipe):
    """The random pipeline deployed at mixed W4 / W2 A8, q / k / v fused: ``"fp8"`` with every A8 linear in FP8
    (4- / 2-bit codes unpacked to e4m3), ``"dequant"`` with deploy's default paths (4- / 2-bit linears
    dequantized per call). PyTorch reference backend: the kernel itself is compared above and in the block
    test below."""
    pipe, ranges = calibrated_copy(random_pipe)
    layers = layer_inventory(pipe.unet)
    config = PrecisionConfig.uniform(layers, 4, 8)
    for i, info in enumerate(layers):
        if info.kind == "linear" and i % 3 == 0:
            config.weight_bits[info.name] = 2
    if request.param == "fp8":
        config = config.with_fp8_linears(layers, low_bit=True)
    deploy(pipe, config, ranges)
    fuse_qkv_projections(pipe)
    return request.param, pipe


def transformer_blocks(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]


def count_unpacking(monkeypatch, kind: str) -> dict[str, int]:
    """Calls of one kind's per-layer unpacking (outside the grouped one) and of its grouped unpacking."""
    counts = {"per_layer": 0, "grouped": 0}
    per_layer_name, grouped_name = KINDS[kind]
    per_layer, grouped = getattr(PackedWeight, per_layer_name), getattr(PackedWeight, grouped_name)
    inside = []

    def count_per_layer(self, *args, **kwargs):
        counts["per_layer"] += not inside
        return per_layer(self, *args, **kwargs)

    def count_grouped(*args, **kwargs):
        counts["grouped"] += 1
        inside.append(1)
        try:
            return grouped(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(PackedWeight, per_layer_name, count_per_layer)
    monkeypatch.setattr(PackedWeight, grouped_name, staticmethod(count_grouped))
    return counts


@torch.no_grad()
def test_grouped_blocks_make_the_same_images_with_one_unpacking_per_block(kind_pipe, monkeypatch):
    kind, pipe = kind_pipe
    blocks = transformer_blocks(pipe)
    members = [layer for b in blocks for layer in block_members(b)]
    assert blocks and all(len(block_members(b)) >= 2 for b in blocks)
    assert {layer.weight_bits for layer in members} == {2, 4}
    counts = count_unpacking(monkeypatch, kind)
    ungrouped = generate(pipe)
    per_layer_calls = counts["per_layer"]
    assert per_layer_calls >= len(members) and counts["grouped"] == 0  # one step: each layer once at least

    counts.update(per_layer=0, grouped=0)
    assert group_unpacking(pipe) == len(blocks) == grouped_blocks(pipe)
    assert group_unpacking(pipe) == len(blocks)  # again: no second set of hooks
    images = generate(pipe)

    assert torch.equal(images, ungrouped)
    assert counts["grouped"] == len(blocks)  # one unpacking per block ...
    assert counts["per_layer"] == per_layer_calls - len(members)  # ... instead of one per member
    assert all(layer.prefetched_weight is None for layer in members)  # released after each block

    assert ungroup_unpacking(pipe) == len(blocks) and grouped_blocks(pipe) == 0
    counts.update(per_layer=0, grouped=0)
    assert torch.equal(generate(pipe), ungrouped) and counts == {"per_layer": per_layer_calls, "grouped": 0}


@torch.no_grad()
def test_a_grouped_block_on_the_triton_kernel_computes_the_same_output(kind_pipe):
    """The block's layers on the Triton backend (FP8: cuBLAS FP8's recipe; grouped kernel interpreted here):
    the same output as each layer unpacking its own weight with the per-layer kernel."""
    _, pipe = kind_pipe
    block = transformer_blocks(pipe)[0]
    for layer in block_members(block):
        layer.backend = "triton"
    width = block.norm1.normalized_shape[0]
    cross = block.attn2.cross_attention_dim
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 16, width, generator=gen), torch.randn(2, 7, cross, generator=gen)
    context[:, 0] = 0  # token 0: the all-zeros embedding, whose K/V the cross-attention cached at deploy
    expected = block(x, encoder_hidden_states=context)
    group_unpacking(pipe)
    assert torch.equal(block(x, encoder_hidden_states=context), expected)
    assert torch.equal(block(hidden_states=x, encoder_hidden_states=context), expected)  # found as a keyword too


@torch.no_grad()
def test_slices_are_released_when_a_block_fails(kind_pipe):
    _, pipe = kind_pipe
    block = transformer_blocks(pipe)[0]
    group_unpacking(pipe)
    with pytest.raises(Exception):  # noqa: B017 - whichever error the mis-sized input raises
        block(torch.randn(1, 3, 5))  # wrong width: the first layer fails after the pre-hook unpacked
    assert all(layer.prefetched_weight is None for layer in block_members(block))


@torch.no_grad()
def test_grouped_blocks_compile_regionally_with_the_same_images(kind_pipe):
    """The hooks trace under torch.compile of each block (fullgraph) and the images do not change."""
    from mixdq.deploy.compile import compile_repeated_blocks

    _, pipe = kind_pipe
    expected = generate(pipe)
    group_unpacking(pipe)
    torch._dynamo.reset()
    try:
        compile_repeated_blocks(pipe, backend="aot_eager", fullgraph=True, dynamic=False)
        images = generate(pipe)
    finally:
        for module in pipe.unet.modules():
            module._compiled_call_impl = None
        torch._dynamo.reset()
    assert torch.equal(images, expected)


def test_nothing_to_group_is_an_error(random_pipe):
    with pytest.raises(ValueError, match="nothing to group"):
        group_unpacking(random_pipe)
