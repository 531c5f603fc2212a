"""deploy(): packed-integer layers against the fake-quant layers they replace, and a deployed pipeline.

On CPU the packed layers run the kernels' PyTorch integer reference; their 16-bit output is the only
difference from the fake-quant layer, so per-layer outputs must agree to one FP16 rounding.
"""

import copy
import gc
import math
import os
import re
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels.pack import PACK_CHUNK, packed_row_bytes
from mixdq.calibrate import calibrate
from mixdq.config import PrecisionConfig
from mixdq.deploy import BosCacheMissError, DeployedConv2d, DeployedLinear, PackedLayer, deploy, deploy_layer
from mixdq.inventory import layer_inventory
from mixdq.memory import MB
from mixdq.quant import QuantLayer, QuantMode, quant_layers, quantize_

WEIGHT_ACT_BITS = [(8, 8), (4, 8), (2, 8), (8, 4), (4, None), (2, None)]


def fake_quant_layer(module: nn.Module, weight_bits, act_bits, x: torch.Tensor, **kwargs) -> QuantLayer:
    """A QuantLayer calibrated on ``x`` by its own CALIBRATE mode (BOS exclusion and concat split included),
    then run once in QUANTIZED mode as inference would (which fills a BOS-aware layer's token-0 cache)."""
    layer = QuantLayer(module, "layer", **kwargs)
    layer.weight_bits = weight_bits
    if act_bits is not None:
        layer.act_bits = act_bits
        layer.mode = QuantMode.CALIBRATE
        layer(x)
        layer.mode = QuantMode.QUANTIZED
    layer(x)
    return layer


def assert_within_fp16_rounding(y: torch.Tensor, ref: torch.Tensor) -> None:
    # One FP16 rounding of the output (relative 2**-11) plus fp32 accumulation-order noise. Measured on CPU
    # (2-core dev box) over the shapes below: max |y - ref| reaches 0.99 of 2**-11 |ref| + 1e-6 max|ref|.
    bound = 2**-11 * ref.abs() + 1e-5 * ref.abs().max()
    excess = ((y - ref).abs() / bound).max().item()
    assert excess <= 1.0, f"deployed output off by {excess:.2f}x the FP16-rounding bound"


@torch.no_grad()
@pytest.mark.parametrize("linear_path", ["gemm", "dequant"])
@pytest.mark.parametrize("weight_bits,act_bits", WEIGHT_ACT_BITS)
def test_linear_matches_fake_quant(weight_bits, act_bits, linear_path):
    torch.manual_seed(0)
    x = torch.randn(4, 10, 96)
    layer = fake_quant_layer(nn.Linear(96, 80), weight_bits, act_bits, x)
    ref = layer(x)
    deployed = deploy_layer(layer, linear_path=linear_path)
    assert isinstance(deployed, DeployedLinear) and not isinstance(deployed, nn.Linear)
    assert deployed.precision == f"W{weight_bits}A{act_bits or 16}"
    assert_within_fp16_rounding(deployed(x), ref)


@torch.no_grad()
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("weight_bits,act_bits", WEIGHT_ACT_BITS)
def test_conv3x3_matches_fake_quant(weight_bits, act_bits, stride):
    torch.manual_seed(1)
    x = torch.randn(2, 32, 9, 9)
    layer = fake_quant_layer(nn.Conv2d(32, 48, 3, stride=stride, padding=1), weight_bits, act_bits, x)
    ref = layer(x)
    deployed = deploy_layer(layer, conv_path="gemm")
    assert isinstance(deployed, DeployedConv2d)
    y = deployed(x)
    assert y.shape == ref.shape
    assert_within_fp16_rounding(y, ref)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_bits,act_bits", [(8, 8), (4, 8), (2, None)])
def test_dequant_conv_path_computes_the_fake_quant_numbers(weight_bits, act_bits, dtype):
    """conv_path='dequant': packed weights unpacked per call + the A8-rounded input, then a float conv. It is
    the fake-quant arithmetic itself (same rounded inputs, same weights), so the outputs differ only by the
    conv's accumulation order (another weight memory layout picks another algorithm)."""
    torch.manual_seed(7)
    cases = [
        (nn.Conv2d(32, 48, 3, stride=2, padding=1), torch.randn(2, 32, 9, 9), {}),
        (
            nn.Conv2d(40, 24, 1),
            torch.cat([torch.randn(2, 16, 8, 8), 20 * torch.randn(2, 24, 8, 8)], 1),
            {"concat_split": 16},
        ),
    ]
    for module, x, kwargs in cases:
        layer = fake_quant_layer(module.to(dtype), weight_bits, act_bits, x.to(dtype), **kwargs)
        ref = layer(x.to(dtype))
        deployed = deploy_layer(layer, conv_path="dequant")
        assert isinstance(deployed, DeployedConv2d) and deployed.conv_path == "dequant"
        y = deployed(x.to(dtype))
        assert y.dtype == dtype and y.shape == ref.shape
        atol = (1e-5 if dtype == torch.float32 else 2**-7) * float(ref.abs().max())  # accumulation order
        torch.testing.assert_close(y, ref, rtol=0, atol=atol)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_bits,act_bits", [(8, 8), (4, 8), (2, 8), (4, None)])
def test_dequant_linear_path_computes_the_fake_quant_numbers(weight_bits, act_bits, dtype):
    """linear_path='dequant': the packed weight unpacked per call, the input rounded to its A8 grid, a float
    matmul -- the fake-quant arithmetic, so only the accumulation order differs; BOS rows still come from the
    precomputed full-precision cache, and the layer holds packed codes only (no float weight)."""
    torch.manual_seed(8)
    x = torch.randn(2, 7, 96)
    for module, kwargs in ((nn.Linear(96, 80), {}), (nn.Linear(96, 48, bias=False), {"bos_aware": True})):
        layer = fake_quant_layer(module.to(dtype), weight_bits, act_bits, x.to(dtype), **kwargs)
        ref = layer(x.to(dtype))
        deployed = deploy_layer(layer, linear_path={weight_bits: "dequant"})
        assert isinstance(deployed, DeployedLinear) and deployed.linear_path == "dequant"
        assert deployed.resolved_backend() == "dequant + matmul"
        assert not [t for t in deployed.buffers() if t.is_floating_point() and t.shape == module.weight.shape]
        y = deployed(x.to(dtype))
        assert y.dtype == dtype and y.shape == ref.shape
        atol = (1e-5 if dtype == torch.float32 else 2**-7) * float(ref.abs().max())  # accumulation order
        torch.testing.assert_close(y, ref, rtol=0, atol=atol)
        if kwargs:
            torch.testing.assert_close(y[:, 0], module(x.to(dtype)[:, 0]), rtol=0, atol=atol)


def test_linear_path_auto_rule_and_per_weight_bits_override():
    """auto (the default): our int8 GEMM for W8A8, the dequant path for packed int4 / int2 and weight-only
    layers (measured faster on an H200); a {bits: path} mapping overrides it for the bit-widths it names."""
    torch.manual_seed(9)
    x = torch.randn(2, 3, 32)
    cases = [  # (weight bits, act bits, path under "auto", path under {4: "gemm", 8: "dequant"})
        (8, 8, "gemm", "dequant"),
        (8, None, "dequant", "dequant"),
        (4, 8, "dequant", "gemm"),
        (2, 8, "dequant", "dequant"),
        (4, None, "dequant", "gemm"),
    ]
    for weight_bits, act_bits, auto, mapped in cases:
        layer = fake_quant_layer(nn.Linear(32, 16), weight_bits, act_bits, x)
        assert deploy_layer(layer).linear_path == auto
        assert deploy_layer(layer, linear_path={4: "gemm", 8: "dequant"}).linear_path == mapped


@pytest.mark.parametrize("linear_path", ["fast", {4: "cublas"}, {3: "dequant"}])
def test_unknown_linear_path_is_refused_before_any_change(fresh_random_pipe, linear_path):
    config = PrecisionConfig.uniform(layer_inventory(fresh_random_pipe.unet), 8, None)
    with pytest.raises(ValueError, match="linear_path must be one of"):
        deploy(fresh_random_pipe, config, linear_path=linear_path)
    assert not quant_layers(fresh_random_pipe)


def test_unknown_conv_path_is_refused_before_any_change(fresh_random_pipe):
    with pytest.raises(ValueError, match="conv_path must be one of"):
        deploy(
            fresh_random_pipe, PrecisionConfig.uniform(layer_inventory(fresh_random_pipe.unet), 8, None), conv_path="x"
        )
    assert not quant_layers(fresh_random_pipe)


@torch.no_grad()
def test_float32_layers_keep_float32_outputs():
    """A float32 model (the CPU path) gets float32 outputs from every deployed layer kind: only fp32 epilogue
    rounding separates them from the fake-quant layers (once, 3x3 convs came back rounded to fp16)."""
    torch.manual_seed(6)
    cases = [
        (nn.Conv2d(8, 16, 3, padding=1), torch.randn(1, 8, 6, 6), 8),
        (nn.Conv2d(8, 16, 1), torch.randn(1, 8, 6, 6), 8),
        (nn.Linear(40, 24), torch.randn(2, 5, 40), 8),
        (nn.Linear(40, 24), torch.randn(2, 5, 40), None),
    ]
    for module, x, act_bits in cases:
        layer = fake_quant_layer(module, 8, act_bits, x)
        ref = layer(x)
        y = deploy_layer(layer, conv_path="gemm")(x)
        assert y.dtype == torch.float32
        assert float((y - ref).norm() / ref.norm()) < 1e-5, (module, act_bits)


@torch.no_grad()
@pytest.mark.parametrize("weight_bits", [8, 4, 2])
def test_concat_split_shortcut_matches_fake_quant(weight_bits):
    """Up-block conv_shortcut: cat([upsampled, skip]) with ranges 20x apart, one activation quantizer each."""
    torch.manual_seed(2)
    x = torch.cat([torch.randn(2, 16, 8, 8), 20 * torch.randn(2, 24, 8, 8)], dim=1)
    layer = fake_quant_layer(nn.Conv2d(40, 24, 1), weight_bits, 8, x, concat_split=16)
    ref = layer(x)
    deployed = deploy_layer(layer, conv_path="gemm")
    assert deployed.k_split == 16 and len(deployed.act_kwargs["act_scale"]) == 2
    assert_within_fp16_rounding(deployed(x), ref)


@torch.no_grad()
@pytest.mark.parametrize("weight_bits,act_bits", [(8, 8), (4, 8), (4, None)])
def test_bos_aware_to_k_serves_token0_from_the_precomputed_cache(weight_bits, act_bits):
    """attn2.to_k: token 0 (the BOS outlier, same for every prompt) gets the full-precision K row."""
    torch.manual_seed(3)
    x = torch.randn(3, 12, 64)
    x[:, 0] = 30 * torch.randn(64)  # one BOS vector, far outside the other tokens' range
    layer = fake_quant_layer(nn.Linear(64, 32), weight_bits, act_bits, x, bos_aware=True)
    fp = layer.fp_module
    ref = layer(x)
    deployed = deploy_layer(layer)
    y = deployed(x)
    torch.testing.assert_close(y[:, 0], fp(x[:, 0]), rtol=1e-6, atol=1e-6)
    assert_within_fp16_rounding(y[:, 1:], ref[:, 1:])

    # guidance with force_zeros_for_empty_prompt: the negative embedding is all zeros, its K row is the bias
    x_cfg = x.clone()
    x_cfg[1, 0] = 0.0
    assert torch.equal(deployed(x_cfg)[1, 0], fp.bias)
    # the same BOS state from another batch size or kernel may differ in its last bits: still a hit
    assert torch.equal(deployed(x * (1 + 1e-5))[:, 0], y[:, 0])
    x_other = x.clone()
    x_other[:, 0] = torch.randn(64)
    with pytest.raises(BosCacheMissError, match="deploy"):
        deployed(x_other)


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA device and TRITON_INTERPRET!=1: Triton cannot launch here",
)
@torch.no_grad()
def test_triton_backend_runs_the_deployed_layers(monkeypatch):
    """The same packed buffers through the Triton kernels (interpreter on CPU) agree with the reference path."""
    import kernels.gemm_wxa8

    calls = []
    real = kernels.gemm_wxa8.gemm_a8
    monkeypatch.setattr(kernels.gemm_wxa8, "gemm_a8", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(nn.Linear(40, 24), torch.randn(2, 5, 40)), (nn.Conv2d(8, 12, 3, padding=1), torch.randn(1, 8, 5, 5))]
    for module, x in cases:
        deployed = deploy_layer(fake_quant_layer(module, 4, 8, x), conv_path="gemm", linear_path="gemm").to(device)
        x = x.to(device)
        deployed.backend = "triton"
        y = deployed(x)
        deployed.backend = "torch"
        assert_within_fp16_rounding(y.float(), deployed(x).float())
    assert len(calls) == 2


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA device and TRITON_INTERPRET!=1: Triton cannot launch here",
)
@torch.no_grad()
def test_dequant_paths_unpack_with_the_triton_kernel_on_the_triton_backend(monkeypatch):
    """backend='triton' (CUDA's 'auto'): the dequant linear and conv unpack their 4- / 2-bit weights with
    kernels.unpack, once per call, compiled too (a custom op), and compute what the torch unpacking computes."""
    import kernels.unpack

    calls = []
    real = kernels.unpack.unpack_dequant
    monkeypatch.setattr(kernels.unpack, "unpack_dequant", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    torch.manual_seed(11)
    x, img = torch.randn(2, 5, 40), torch.randn(1, 8, 5, 5)
    linear = deploy_layer(fake_quant_layer(nn.Linear(40, 24), 4, 8, x), linear_path="dequant")
    conv = deploy_layer(fake_quant_layer(nn.Conv2d(8, 12, 3, padding=1), 2, None, img), conv_path="dequant")
    expected = linear(x), conv(img)
    assert calls == []  # the CPU's torch backend unpacks with PyTorch ops
    for layer in (linear, conv):
        layer.backend = "triton"
    assert torch.equal(linear(x), expected[0]) and torch.equal(conv(img), expected[1])
    assert calls == [4, 2]
    compiled = torch.compile(lambda x, img: (linear(x), conv(img)), backend="aot_eager", fullgraph=True)(x, img)
    assert torch.equal(compiled[0], expected[0]) and torch.equal(compiled[1], expected[1])
    assert calls == [4, 2, 4, 2]


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA device and TRITON_INTERPRET!=1: Triton cannot launch here",
)
@torch.no_grad()
def test_deployed_layers_compile_without_graph_breaks(monkeypatch):
    """torch.compile(fullgraph=True) traces deployed A8, weight-only and 3x3-conv layers (the Triton GEMMs are
    custom ops with fake implementations, checked by aot_eager) and computes exactly what eager computes,
    though compiled, the A8 linear's input is quantized by graph ops (int8 into the GEMM op, fusable into its
    producer) instead of by the launcher's quantization kernel (float into the GEMM op), and the GEMM reads
    its quantizers from a tensor (gemm_a8_codes), not from per-layer Python numbers."""
    import kernels.gemm_wxa8

    gemm_inputs = []
    for name in ("gemm_a8", "gemm_a8_codes"):
        real = getattr(kernels.gemm_wxa8, name)
        spy = lambda x, *a, _real=real, _name=name, **k: gemm_inputs.append((_name, x.dtype)) or _real(x, *a, **k)
        monkeypatch.setattr(kernels.gemm_wxa8, name, spy)
    torch.manual_seed(5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, img = torch.randn(2, 5, 40), torch.randn(1, 8, 5, 5)
    a8 = deploy_layer(fake_quant_layer(nn.Linear(40, 24), 4, 8, x), linear_path="gemm")
    a16 = deploy_layer(fake_quant_layer(nn.Linear(24, 16), 8, None, torch.randn(2, 5, 24)), linear_path="gemm")
    conv = deploy_layer(fake_quant_layer(nn.Conv2d(8, 12, 3, padding=1), 2, 8, img), conv_path="gemm")
    both = torch.cat([img, 30 * torch.randn(1, 4, 5, 5)], dim=1)
    shortcut = deploy_layer(fake_quant_layer(nn.Conv2d(12, 8, 1), 4, 8, both, concat_split=8), conv_path="gemm")
    for layer in (a8, a16, conv, shortcut):
        layer.backend = "triton"

    def block(x, img, both):
        return a16(F.gelu(a8(x))), conv(F.silu(img)), shortcut(both)

    x, img, both = x.to(device).half(), img.to(device).half(), both.to(device).half()
    for layer in (a8, a16, conv, shortcut):
        layer.half().to(device)  # must not round the activation quantizers held for torch.compile
    eager = block(x, img, both)
    # linear and 1x1 conv: the launcher quantizes; 3x3 conv: quantized before im2col
    assert gemm_inputs == [("gemm_a8", torch.float16), ("gemm_a8", torch.int8), ("gemm_a8", torch.float16)]
    gemm_inputs.clear()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x, img, both)
    assert gemm_inputs == [("gemm_a8_codes", torch.int8)] * 3
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA device and TRITON_INTERPRET!=1: Triton cannot launch here",
)
@torch.no_grad()
def test_compiled_layers_share_their_activation_quantizer_kernel():
    """Two A8 layers of one shape with different activation ranges compile to ONE quantization kernel: the
    quantizers are tensors, not Python numbers baked into each generated kernel (which made ~720 unique
    Inductor kernels for a deployed SDXL UNet against ~60 in FP16, and ~245 s of warm-up on an H200)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    first = deploy_layer(fake_quant_layer(nn.Linear(32, 32), 8, 8, x))
    second = deploy_layer(fake_quant_layer(nn.Linear(32, 32), 8, 8, x * 5))
    assert first.act_kwargs["act_scale"] != second.act_kwargs["act_scale"]
    for layer in (first, second):
        layer.backend = "triton"  # the GEMM is an opaque custom op: what Inductor generates is the quantization
    block = lambda x: second(first(x))
    eager = block(x)
    torch._dynamo.reset()
    compiled, code = run_and_get_code(torch.compile(block, fullgraph=True), x)
    assert torch.equal(compiled, eager)
    source = "\n".join(code)
    kernels_defined = set(re.findall(r"^(?:async_compile\.\w+\(|)(\w*(?:cpp|triton)_\w+) = ", source, re.MULTILINE))
    kernel_calls = re.findall(r"^\s+(\w*(?:cpp|triton)_\w+)\(", source, re.MULTILINE)
    assert len(kernel_calls) >= 2 and len(kernels_defined) == 1, (kernels_defined, kernel_calls)


# ---- a whole deployed pipeline ---------------------------------------------------------------------
CALIBRATION_PROMPTS = ["a red circle above a blue square", "a green triangle left of a purple circle"]
ACT_ONLY_LAYER = "mid_block.attentions.0.proj_out"
PROTECTED = ["conv_in", "conv_out"]


def mixed_config(unet: nn.Module, act_ranges=None) -> PrecisionConfig:
    """MixDQ-like mix: content layers cycle W2/W4/W8, quality layers W4/W8, A8 except every fifth layer
    (weight-only), one activation-only layer (unless ``act_ranges`` is None: no activations), two protected."""
    weight_bits, act_bits = {}, {}
    for i, info in enumerate(layer_inventory(unet)):
        choices = (2, 4, 8) if info.group == "content" else (4, 8)
        weight_bits[info.name] = choices[i % len(choices)]
        if i % 5 and act_ranges is not None:
            act_bits[info.name] = 8
    if act_ranges is not None:
        del weight_bits[ACT_ONLY_LAYER]
        act_bits[ACT_ONLY_LAYER] = 8
    return PrecisionConfig(weight_bits=weight_bits, act_bits=act_bits, protected=PROTECTED)


def generate(pipe) -> torch.Tensor:
    """One prompt with guidance 2: the UNet sees the BOS of the prompt and the all-zeros negative embedding."""
    return pipe(
        prompt="a blue circle right of a red triangle",
        num_inference_steps=1,
        guidance_scale=2.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(1234),
        output_type="pt",
    ).images


@pytest.fixture(scope="module")
def deployed_pipe(random_pipe):
    pipe = type(random_pipe)(**{**random_pipe.components, "unet": copy.deepcopy(random_pipe.unet)})
    pipe.set_progress_bar_config(disable=True)
    ranges = calibrate(
        pipe, CALIBRATION_PROMPTS, num_inference_steps=1, height=64, width=64, act_bits=(8,), progress=False
    )
    config = mixed_config(pipe.unet, ranges)
    quantize_(pipe, config, ranges)
    fake_images = generate(pipe)
    fp_weights = [weakref.ref(q.fp_module.weight) for q in quant_layers(pipe).values() if q.weight_bits is not None]
    protected = {name: pipe.unet.get_submodule(name).fp_module for name in PROTECTED}
    report = deploy(pipe)
    gc.collect()
    images = generate(pipe)
    return types.SimpleNamespace(
        pipe=pipe,
        config=config,
        report=report,
        fake_images=fake_images,
        images=images,
        fp_weights=fp_weights,
        protected=protected,
    )


def test_deployed_images_match_fake_quant(deployed_pipe):
    psnr = 10 * torch.log10(1.0 / (deployed_pipe.images - deployed_pipe.fake_images).pow(2).mean()).item()
    print(f"deployed vs fake-quant PSNR {psnr:.1f} dB")
    # Measured on CPU (2-core dev box, random-weight fixture, 1 step, 64 px, guidance 2): 65.9 dB with the default
    # linear_path="auto" (packed int4 / int2 and weight-only linears on the dequant path); 57.2 dB with every
    # linear on the integer GEMM; 49.0 dB while float32 layers still returned float16.
    assert psnr > 50.0


def test_fp_weights_of_packed_layers_are_freed(deployed_pipe):
    unet = deployed_pipe.pipe.unet
    assert deployed_pipe.fp_weights and all(ref() is None for ref in deployed_pipe.fp_weights)
    packed = [m for m in unet.modules() if isinstance(m, PackedLayer)]
    assert len(packed) == len(deployed_pipe.fp_weights)
    assert all(not list(m.parameters()) for m in packed)
    assert isinstance(unet.get_submodule(ACT_ONLY_LAYER), QuantLayer)  # FP weight, quantized input: fake path


def test_protected_layers_stay_plain_fp(deployed_pipe):
    for name, original in deployed_pipe.protected.items():
        module = deployed_pipe.pipe.unet.get_submodule(name)
        assert module is original and type(module) is nn.Conv2d


# ---- bytes held, counted by hand from the layers' shapes and bits --------------------------------------
def packed_row_bytes_by_hand(k: int, bits: int, k_split: int | None = None) -> int:
    """One packed weight row (kernels/pack.py's format): 8 bits one byte per code; 4 and 2 bits in chunks of
    PACK_CHUNK codes (PACK_CHUNK * bits / 8 bytes each), each input part padded to whole chunks."""
    if bits == 8:
        return k
    parts = [k] if k_split is None else [k_split, k - k_split]
    return sum(-(-part // PACK_CHUNK) * PACK_CHUNK * bits // 8 for part in parts)


def packed_bytes_by_hand(
    shape: tuple[int, ...],
    bits: int,
    act_bits: int | None,
    has_bias: bool,
    k_split: int | None = None,
    bos_vectors: int = 0,
    float_bytes: int = 4,
) -> int:
    """Bytes a deployed packed layer holds, from its weight shape and bits alone: the packed rows, a float32
    scale per row and input part (MixDQ's per-slice scales of a split shortcut), an int32 row sum per row and input part, the bias in the model's float dtype, the activation
    quantizer as float32 (1 / s, zp, s) per input part (A8 only), and the BOS cache of cross-attention K/V
    (``bos_vectors`` inputs of width K and their outputs of width N, model dtype; weight-only layers too)."""
    n, k = shape[0], math.prod(shape[1:])
    parts = 1 if k_split is None else 2
    total = n * packed_row_bytes_by_hand(k, bits, k_split) + 4 * n * parts + 4 * n * parts
    total += n * float_bytes if has_bias else 0
    total += 3 * 4 * parts if act_bits is not None else 0
    return total + bos_vectors * (k + n) * float_bytes


def test_packed_row_bytes_by_hand_examples():
    """The hand rule at worked sizes (and the kernels' packer agrees with it)."""
    assert packed_row_bytes_by_hand(320, 8) == 320
    assert packed_row_bytes_by_hand(320, 4) == 3 * 64  # 320 codes -> 3 chunks of 128 codes, 64 B each
    assert packed_row_bytes_by_hand(320, 2) == 3 * 32
    assert packed_row_bytes_by_hand(96, 4, k_split=64) == 64 + 64  # 64 and 32 codes: one chunk each
    for k, bits, split in [(320, 4, None), (320, 2, None), (96, 4, 64), (1280, 2, 640), (77, 8, None)]:
        assert packed_row_bytes(k, bits, split) == packed_row_bytes_by_hand(k, bits, split)
    # a 4-bit 1280 x 640 linear with bias, A8, in FP16: 1280 rows of 5 chunks (320 B) + 4 B scale + 4 B row sum
    # + 2 B bias, + 12 B of activation quantizer
    assert packed_bytes_by_hand((1280, 640), 4, 8, True, float_bytes=2) == 1280 * (320 + 4 + 4 + 2) + 12


def is_cross_attention_kv(name: str) -> bool:
    return ".attn2.to_k" in name or ".attn2.to_v" in name


def expected_layer_bytes(info, config: PrecisionConfig, float_bytes: int) -> int:
    """What the deployed module of layer ``info`` holds under ``config``, by hand (see packed_bytes_by_hand)."""
    n, k = info.out_features, info.in_features
    fp = (n * k + (n if info.has_bias else 0)) * float_bytes
    if info.name in config.protected:
        return fp
    bits, act_bits = config.weight_bits.get(info.name), config.act_bits.get(info.name)
    if bits is None:  # activation-only: the fake-quant layer, its FP weight, the three weight-bit scales
        # (float32 per row) and its A8 state per input part: range (lo, hi), scale and zero point (float32, int32)
        parts = 1 if info.concat_split is None else 2
        return fp + 3 * 4 * n + (8 + 4 + 4) * parts
    # the pipeline's BOS state and the all-zeros negative embedding: two distinct token-0 vectors
    bos = 2 if is_cross_attention_kv(info.name) else 0
    return packed_bytes_by_hand(info.weight_shape, bits, act_bits, info.has_bias, info.concat_split, bos, float_bytes)


def other_param_bytes(unet: nn.Module) -> int:
    """Bytes of the FP UNet's parameters outside the quantizable layers (norms, embeddings ...)."""
    layers = {info.name for info in layer_inventory(unet)}
    return sum(
        p.numel() * p.element_size() for name, p in unet.named_parameters() if name.rsplit(".", 1)[0] not in layers
    )


def test_report_counts_backends_and_exact_bytes(deployed_pipe, random_pipe):
    report, unet = deployed_pipe.report, deployed_pipe.pipe.unet
    inventory = layer_inventory(random_pipe.unet)  # the FP UNet the fixture deployed a copy of (float32)
    by_name = {layer.name: layer for layer in report.layers}
    expected = {info.name: expected_layer_bytes(info, deployed_pipe.config, 4) for info in inventory}
    assert {name: by_name[name].nbytes for name in expected} == expected
    assert report.weight_bytes == sum(expected.values()) + other_param_bytes(random_pipe.unet)
    weight_only_kv = [
        info.name
        for info in inventory
        if is_cross_attention_kv(info.name) and info.name not in deployed_pipe.config.act_bits
    ]
    assert weight_only_kv and all(unet.get_submodule(name).bos_outputs.shape[0] == 2 for name in weight_only_kv)
    assert by_name[ACT_ONLY_LAYER].precision == "W16A8" and by_name["conv_in"].precision == "FP16"
    packed = {name: m for name, m in unet.named_modules() if isinstance(m, PackedLayer)}
    convs = {name for name, m in packed.items() if m.kind == "conv"}
    assert convs and all(packed[name].conv_path == "dequant" for name in convs)  # the default
    assert {layer.name for layer in report.layers if layer.backend == "dequant + conv"} == convs
    linears = set(packed) - convs  # the default linear_path="auto": int8 GEMM for W8A8, dequant otherwise
    gemm = {name for name in linears if (packed[name].weight_bits, packed[name].act_bits) == (8, 8)}
    assert gemm and gemm != linears and all(packed[name].linear_path == "gemm" for name in gemm)
    assert {layer.name for layer in report.layers if layer.backend == "torch reference"} == gemm  # CPU
    assert {layer.name for layer in report.layers if layer.backend == "dequant + matmul"} == linears - gemm
    assert len(report.layers) == len(packed) + len(PROTECTED) + 1  # + the activation-only layer
    line = report.describe()
    print(line)
    assert line.startswith(f"deployed {len(report.layers)} layers: ") and "CPU reference path" in line
    assert f"{report.fp16_bytes / MB:.1f} MB FP16" in line


@torch.no_grad()
def test_fp16_bytes_match_the_accounting_plus_kernel_extras(fresh_random_pipe):
    """In FP16, bytes held and mixdq.memory's accounting, both counted by hand from the layer shapes: the
    accounting is ceil(K * bits / 8) bytes + an FP16 scale per row and input part + the FP16 bias per row; the
    kernels hold 2 B more per row and part (float32 scales), 4 B per row and input part (int32 row sums), 4- and 2-bit rows padded to whole
    chunks per input part, 12 B per input part of A8 quantizer, the BOS K/V caches."""
    pipe = fresh_random_pipe
    pipe.unet.half()
    inventory = layer_inventory(pipe.unet)
    other = other_param_bytes(pipe.unet)
    parts = {info.name: 1 if info.concat_split is None else 2 for info in inventory}
    ranges = {8: {name: torch.tensor([[-4.0, 4.0]] * n) for name, n in parts.items()}}  # no calibration needed
    config = mixed_config(pipe.unet, ranges)
    report = deploy(pipe, config, ranges)

    by_name = {layer.name: layer for layer in report.layers}
    for info in inventory:
        bits = None if info.name in config.protected else config.weight_bits.get(info.name)
        bias = 2 * info.out_features if info.has_bias else 0
        slices = (
            [info.in_features]
            if info.concat_split is None
            else [info.concat_split, info.in_features - info.concat_split]
        )
        row = sum(-(-k * bits // 8) + 2 for k in slices) if bits is not None else 2 * info.in_features
        assert by_name[info.name].accounted_bytes == info.out_features * row + bias, info.name
    expected = {info.name: expected_layer_bytes(info, config, 2) for info in inventory}
    # the activation-only layer's float32 scales and A8 state stay float32 through .half() (its FP weight is FP16)
    assert {name: by_name[name].nbytes for name in expected} == expected
    assert report.weight_bytes == sum(expected.values()) + other
    assert report.accounted_bytes == sum(layer.accounted_bytes for layer in report.layers) + other
    accounted_ratio = report.fp16_bytes / report.accounted_bytes
    print(
        f"FP16 deploy: held {report.weight_bytes} B, accounted {report.accounted_bytes} B, FP16 {report.fp16_bytes} B; "
        f"{report.ratio:.2f}x vs {accounted_ratio:.2f}x accounted"
    )
    # tiny fixture (K = 32..1280): the per-row extras are ~5% of the packed bytes; at SDXL sizes < 2%
    assert report.ratio > 0.9 * accounted_ratio
    assert "float tensors held" not in report.describe()


def test_inventory_is_unchanged_by_deploy(fresh_random_pipe):
    """Deployed packed layers still report the layer they replaced (names, shapes, bias, other params)."""
    from mixdq.calibrate import calibrate
    from mixdq.config import PrecisionConfig
    from mixdq.deploy import deploy
    from mixdq.inventory import layer_inventory, non_layer_param_count

    pipe = fresh_random_pipe
    before, other_before = layer_inventory(pipe.unet), non_layer_param_count(pipe.unet)
    ranges = calibrate(pipe, prompts=["a red circle"], num_inference_steps=1, height=64, width=64, progress=False)
    deploy(pipe, PrecisionConfig.uniform(before, 4, 8), ranges)
    assert layer_inventory(pipe.unet) == before
    assert non_layer_param_count(pipe.unet) == other_before


@torch.no_grad()
def test_regionally_compiled_deployed_pipeline_makes_the_same_images(deployed_pipe):
    """mixdq.deploy.compile.compile_repeated_blocks on a deployed pipeline (the GPU benchmark's fast-warm-up path): the
    mixed config's blocks trace without graph breaks and generate what the eager deployed pipeline generates."""
    from mixdq.deploy.compile import REPEATED_BLOCKS, STAGES, compile_repeated_blocks

    unet = deployed_pipe.pipe.unet
    kinds = [type(m).__name__ for m in unet.modules()]
    torch._dynamo.reset()
    try:
        # the coarser regions: every transformer whole (its blocks inside it are not regions of their own)
        n = compile_repeated_blocks(deployed_pipe.pipe, STAGES)
        assert n == sum(kinds.count(kind) for kind in STAGES) and kinds.count("BasicTransformerBlock") > 0
        for module in unet.modules():
            module._compiled_call_impl = None
        n = compile_repeated_blocks(deployed_pipe.pipe, backend="aot_eager", fullgraph=True, dynamic=False)
        assert n == sum(kinds.count(kind) for kind in REPEATED_BLOCKS)
        images = generate(deployed_pipe.pipe)
    finally:
        for module in unet.modules():
            module._compiled_call_impl = None  # the other tests of this module run the eager layers
        torch._dynamo.reset()
    torch.testing.assert_close(images, deployed_pipe.images, rtol=0, atol=1e-5)
