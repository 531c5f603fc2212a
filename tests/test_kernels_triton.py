"""Triton kernels against the integer reference: int32 accumulators bit-exact, 16-bit outputs within rounding.

On CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU),
so shapes are small; on a CUDA machine the same tests run the compiled kernels.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET!=1: Triton cannot launch here", allow_module_level=True)

from kernels import PackedWeight, conv2d_quant, conv_weight_matrix, quant_linear, reference
from kernels.act_quant import quantize_act
from kernels.gemm_weight_only import gemm_a16
from kernels.gemm_wxa8 import gemm_a8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (M, N, K, k_split): M = 1 (time-embedding linears) with K = 75 (a partly filled last byte when packed),
# sizes off the 32-blocks, a concat input split at K = 40
# and one of several 128-code chunks with the split inside a chunk (each part is packed separately)
SHAPES = [(1, 40, 75, None), (37, 48, 80, None), (33, 40, 96, 40), (20, 24, 300, 140)]


def make_weight(n: int, k: int, bits: int, k_split=None, seed: int = 0) -> PackedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, s = reference.quantize_weight(w, bits, k_split)  # with a split: [2, N] scales, one row per K part
    return PackedWeight.from_codes(q, s, bits, k_split).to(DEVICE)


def assert_within_fp16_rounding(out: torch.Tensor, ref: torch.Tensor) -> None:
    # 1 ulp of the 16-bit output, plus a small absolute floor for outputs near 0 (fp32 epilogue rounding)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-10, atol=1e-4 * ref.float().abs().max().item())


def test_act_quant_bit_exact_with_ties_and_saturation():
    x = torch.cat([torch.tensor([-0.125, 0.125, 0.375, 0.625, -1e4, 1e4]), torch.randn(200) * 5]).to(DEVICE)
    x = x.view(2, 103).half()  # odd row length: masked tails
    for bits, zp in [(8, 3), (8, 250), (4, 9)]:
        assert torch.equal(quantize_act(x, 0.25, zp, bits), reference.quantize_act(x, 0.25, zp, bits))


def test_act_quant_into_strided_concat_buffer():
    x1, x2 = torch.randn(4, 3, 16, device=DEVICE), torch.randn(4, 3, 24, device=DEVICE) * 10
    buf = torch.empty(4, 3, 40, dtype=torch.int8, device=DEVICE)
    quantize_act(x1, 0.02, 128, out=buf[..., :16])
    quantize_act(x2, 0.2, 30, out=buf[..., 16:])
    assert torch.equal(buf[..., :16], reference.quantize_act(x1, 0.02, 128))
    assert torch.equal(buf[..., 16:], reference.quantize_act(x2, 0.2, 30))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("M,N,K,k_split", SHAPES)
@pytest.mark.parametrize("prequantized", [True, False], ids=["int8-in", "float-in"])
@pytest.mark.parametrize("swap", [None, True, False], ids=["swap-rule", "swap", "no-swap"])
def test_gemm_a8_matches_reference(bits, M, N, K, k_split, prequantized, swap):
    g = torch.Generator().manual_seed(M + bits)
    weight = make_weight(N, K, bits, k_split, seed=bits)
    x = (torch.randn(M, K, generator=g) * 3).half().to(DEVICE)
    bias = torch.randn(N, generator=g).to(DEVICE)
    scale, zp = ((0.03, 0.05), (120, 7)) if k_split else (0.03, 120)
    if prequantized:
        parts = reference.act_parts(weight, scale, zp)
        x = torch.cat([reference.quantize_act(x[:, a:b], s, z) for a, b, s, z in parts], dim=1)
    acc = gemm_a8(x, weight, scale, zp, return_acc=True, swap=swap)
    assert acc.dtype == torch.int32
    assert torch.equal(acc, reference.gemm_a8(x, weight, scale, zp, return_acc=True))
    out = gemm_a8(x, weight, scale, zp, bias, swap=swap)
    assert out.dtype == torch.float16 and out.shape == (M, N)
    assert_within_fp16_rounding(out, reference.gemm_a8(x, weight, scale, zp, bias))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("M,N,K,k_split", SHAPES)
def test_gemm_a8_codes_reads_the_quantizers_from_a_tensor(bits, M, N, K, k_split):
    """The compiled deployed layers' GEMM: the same int32 accumulators and the same outputs, bit for bit, as
    with the quantizers passed as launch arguments."""
    from kernels.gemm_wxa8 import gemm_a8_codes

    g = torch.Generator().manual_seed(M + bits)
    weight = make_weight(N, K, bits, k_split, seed=bits)
    bias = torch.randn(N, generator=g).to(DEVICE)
    scale, zp = ((0.03, 0.05), (120, 7)) if k_split else (0.03, 120)
    x = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8).to(DEVICE)
    params = reference.act_params_tensor(weight, scale, zp, DEVICE)
    acc = gemm_a8_codes(x, weight, params, return_acc=True)
    assert torch.equal(acc, reference.gemm_a8(x, weight, scale, zp, return_acc=True))
    assert torch.equal(gemm_a8_codes(x, weight, params, bias), gemm_a8(x, weight, scale, zp, bias))
    torch.testing.assert_close(
        reference.gemm_a8_codes(x, weight, params, bias), reference.gemm_a8(x, weight, scale, zp, bias), rtol=0, atol=0
    )


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,k_split", SHAPES)
def test_unpack_dequant_kernel_equals_the_torch_unpacking(bits, dtype, M, N, K, k_split):
    """kernels.unpack (the dequant paths' weight on a GPU) is bit-exact with PackedWeight.dequantize in
    PyTorch: partial chunks, a split inside a chunk, row counts off the block size."""
    weight = make_weight(N + M, K, bits, k_split, seed=bits)  # N + M: more row counts
    out = weight.dequantize(dtype, backend="triton")
    assert out.dtype == dtype and out.shape == (N + M, K)
    ref = weight.dequantize(dtype, backend="torch")
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter truncates float32 -> bfloat16 whatever the rounding asked for; the GPU rounds
        # to nearest even like torch: here, within one bfloat16 step of it
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("N,K,k_split", [(40, 75, None), (33, 300, 140)])
def test_unpack_codes_fp8_kernel_is_exact(bits, N, K, k_split):
    """The FP8 paths' unpacking writes each integer code itself in e4m3 (exact: |code| <= 8), bit for bit
    what PyTorch's unpacking gives, and refuses 8-bit codes (not exact in e4m3)."""
    weight = make_weight(N, K, bits, k_split, seed=bits)
    out = weight.codes_fp8(backend="triton")
    assert out.dtype == torch.float8_e4m3fn and out.shape == (N, K)
    assert torch.equal(out.view(torch.uint8), weight.codes_fp8(backend="torch").view(torch.uint8))
    assert torch.equal(out.float(), weight.codes().float())
    with pytest.raises(ValueError, match="not exact"):
        make_weight(N, K, 8).codes_fp8()


def test_gemm_a8_four_bit_activations():
    weight = make_weight(24, 48, 4)
    x = torch.randn(5, 48, device=DEVICE)
    acc = gemm_a8(x, weight, 0.2, 8, act_bits=4, return_acc=True)
    assert torch.equal(acc, reference.gemm_a8(x, weight, 0.2, 8, act_bits=4, return_acc=True))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("M,N,K,k_split", [(1, 40, 75, None), (37, 48, 80, None), (20, 24, 300, 140)])
def test_gemm_weight_only_matches_reference(bits, M, N, K, k_split):
    weight = make_weight(N, K, bits, k_split, seed=bits)
    g = torch.Generator().manual_seed(M)
    # small integers: every product and partial sum is exact in fp32, so only the epilogue can differ
    x_int = torch.randint(-8, 9, (M, K), generator=g).half().to(DEVICE)
    bias = torch.randn(N, generator=g).to(DEVICE)
    out = gemm_a16(x_int, weight, bias)
    assert out.dtype == torch.float16
    assert_within_fp16_rounding(out, reference.gemm_a16(x_int, weight, bias))
    x = torch.randn(M, K, generator=g).half().to(DEVICE)
    assert_within_fp16_rounding(gemm_a16(x, weight), reference.gemm_a16(x, weight))


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
@pytest.mark.parametrize("act", [True, False], ids=["w4a8", "w4a16"])
def test_conv2d_quant_triton_matches_torch_backend(kernel, stride, padding, act):
    g = torch.Generator().manual_seed(kernel)
    x = torch.randn(1, 8, 6, 5, generator=g).half().to(DEVICE).to(memory_format=torch.channels_last)
    w = torch.randn(12, 8, kernel, kernel, generator=g)
    q, s = reference.quantize_weight(w.flatten(1), 4)
    weight = PackedWeight.from_codes(conv_weight_matrix(q.view_as(w)), s, 4).to(DEVICE)
    act_args = (0.02, 100) if act else (None, None)
    out = conv2d_quant(x, weight, kernel, stride, padding, *act_args, backend="triton")
    ref = conv2d_quant(x, weight, kernel, stride, padding, *act_args, backend="torch")
    assert out.shape == ref.shape
    assert_within_fp16_rounding(out, ref)


def test_conv2d_quant_concat_shortcut():
    x = torch.cat([torch.randn(1, 16, 4, 4), torch.randn(1, 24, 4, 4) * 30], dim=1).half().to(DEVICE)
    weight = make_weight(8, 40, 8, k_split=16)
    out = conv2d_quant(x, weight, 1, act_scale=(0.02, 0.5), act_zp=(128, 60), backend="triton")
    ref = conv2d_quant(x, weight, 1, act_scale=(0.02, 0.5), act_zp=(128, 60), backend="torch")
    assert_within_fp16_rounding(out, ref)


def test_dispatcher_runs_the_triton_kernels(monkeypatch):
    """``backend="triton"`` (and ``"auto"`` on CUDA) must reach the kernels, not the reference."""
    import kernels.gemm_weight_only
    import kernels.gemm_wxa8

    calls = []
    for module, name in [(kernels.gemm_wxa8, "gemm_a8"), (kernels.gemm_weight_only, "gemm_a16")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    weight = make_weight(16, 32, 4)
    x = torch.randn(2, 3, 32, device=DEVICE).half()
    backend = "auto" if DEVICE == "cuda" else "triton"
    y = quant_linear(x, weight, 0.05, 128, backend=backend)
    assert y.shape == (2, 3, 16)
    quant_linear(x, weight, backend=backend)
    assert calls == ["gemm_a8", "gemm_a16"]
    assert kernels.resolve_backend(torch.zeros(1), "auto") == "torch"


@pytest.mark.parametrize("M,N,K", [(37, 72, 96), (64, 40, 160)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_tma_gemm_a8_is_bit_exact_with_the_integer_reference(M, N, K, with_bias):
    """kernels.gemm_a8_tma (TMA tile loads, persistent grid) keeps gemm_a8's contract: bit-exact int32
    accumulators through the epilogue (so outputs equal the pointer-loading kernel's), from int8 codes with the
    quantizer as numbers or as the compiled path's tensor; sizes off the tiles (TMA pads with zeros)."""
    from kernels.gemm_wxa8 import gemm_a8_codes

    weight = make_weight(N, K, 8, seed=K)
    x = torch.randn(M, K, device=DEVICE)
    codes = quantize_act(x, 0.03, 5)
    bias = torch.randn(N, device=DEVICE) if with_bias else None
    out = gemm_a8(codes, weight, 0.03, 5, bias, tma=True)
    assert torch.equal(out, gemm_a8(codes, weight, 0.03, 5, bias, tma=False))
    assert_within_fp16_rounding(out, reference.gemm_a8(codes, weight, 0.03, 5, bias))
    params = reference.act_params_tensor(weight, 0.03, 5, DEVICE)
    assert torch.equal(gemm_a8_codes(codes, weight, params, bias, tma=True), out)


def test_tma_gemm_rule_and_refusals():
    """Large 8-bit GEMMs only (measured at 8192^3); packed or split weights are refused if forced."""
    from kernels import gemm_a8_tma

    def shape(m, n, k, bits=8, device="meta"):
        x = torch.empty(m, k, dtype=torch.int8, device=device)
        data = torch.empty(n, k if bits == 8 else k * bits // 8, dtype=torch.int8 if bits == 8 else torch.uint8)
        return x, PackedWeight(data.to(device), torch.empty(n, device=device), torch.empty(1, n), bits, k)

    big = shape(8192, 8192, 8192)
    assert gemm_a8_tma.use_tma(*big, sms=132) == (DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9)
    assert not gemm_a8_tma.use_tma(*shape(4096, 640, 2560), sms=132)  # an SDXL shape: the measured kernel
    assert not gemm_a8_tma.use_tma(*shape(8192, 8192, 8192, bits=4), sms=132)
    weight = make_weight(24, 64, 4)
    with pytest.raises(ValueError, match="8-bit weights"):
        gemm_a8(torch.zeros(4, 64, dtype=torch.int8, device=DEVICE), weight, 0.1, 0, tma=True)
