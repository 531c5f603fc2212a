"""The fused low-bit FP8 GEMM (kernels/gemm_fp8_lowbit.py) against a float32 PyTorch reference.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU). The
interpreter runs the kernel's own arithmetic -- byte loads, shifts and masks, the float16 exponent trick, the
float16 -> e4m3 cast, masked loads, the K loop -- with numpy; its ``tl.dot`` on e4m3 operands multiplies their
values in float32, so the products are the GPU's (exact: e4m3 x small integer) and only the order of the float32
sums differs from an FP8 tensor core's. On a CUDA machine the same tests run the compiled kernel.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET!=1: Triton cannot launch here", allow_module_level=True)

from kernels import PackedWeight, reference
from kernels.gemm_fp8_lowbit import fp8_lowbit_linear, get_fp8_lowbit_autotune_config, swap_ab

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3 = torch.float8_e4m3fn
# (M, N, K): one row; ragged M and N (masked tile edges); K inside one chunk, K = one BLOCK_K step plus a ragged
# chunk (a chunk past K in the last step), and several steps
SHAPES = [(1, 40, 96), (37, 48, 80), (20, 24, 300), (33, 64, 512)]


def make_weight(n: int, k: int, bits: int, seed: int = 0) -> PackedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, s = reference.quantize_weight(w, bits)
    return PackedWeight.from_codes(q, s.float(), bits).to(DEVICE)


def make_x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    """e4m3 activations across the format's range, NaN-free (what kernels.fp8.quantize_fp8 writes)."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 40
    return x.clamp(-448, 448).to(E4M3).to(DEVICE)


def reference_linear(x, weight: PackedWeight, out_scale, bias, out_dtype):
    """Unpack with kernels.pack's reference, dequantize, multiply in float64, then the float32 epilogue."""
    acc = x.double() @ weight.codes().double().T
    out = acc.float() * out_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    return out, out.to(out_dtype)


# relative accumulation error per unit of sum_k |x q|: float32 rounding, once per product added (interpreter);
# on a GPU also the FP8 tensor cores' own adds inside a 128-code chunk, which keep fewer mantissa bits than
# float32 (about 14, by DeepSeek-V3's report for H800; at most 4 such adds a chunk: 4 * 2**-13, doubled). An
# assumption until a run on the H200 confirms it; the bit-exact tests below do not depend on it.
GPU_ACCUMULATION_REL = 2**-10


def assert_within_accumulation_rounding(out, ref_f32, ref_rounded, x, weight):
    """The kernel's sums may differ from the float64 reference by accumulation rounding only, bounded by
    sum_k |x q| times K float32 ulps (GPU_ACCUMULATION_REL on a GPU); then one rounding to the 16-bit output."""
    rel = 2**-23 * x.shape[1] if DEVICE == "cpu" else max(2**-23 * x.shape[1], GPU_ACCUMULATION_REL)
    bound = (x.double().abs() @ weight.codes().double().abs().T).float() * rel
    scale = weight.scale.float().abs().max()
    ulp16 = ref_rounded.float().abs() * (2**-10 if out.dtype == torch.float16 else 2**-7)
    err = (out.float() - ref_f32).abs()
    assert torch.all(err <= bound * scale + ulp16 + 1e-30), float((err - bound * scale - ulp16).max())


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("swap", [False, True], ids=["x-left", "w-left"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_fp8_lowbit_matches_reference(bits, M, N, K, swap, with_bias):
    weight = make_weight(N, K, bits, seed=M + bits)
    x = make_x(M, K, seed=K)
    out_scale = (weight.scale.float() * 0.0123).to(DEVICE)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(N)).half().to(DEVICE) if with_bias else None
    out = fp8_lowbit_linear(x, weight, out_scale, bias, torch.float16, swap=swap)
    ref_f32, ref16 = reference_linear(x.cpu(), weight.to("cpu"), out_scale.cpu(), bias, torch.float16)
    assert out.shape == (M, N) and out.dtype == torch.float16
    assert_within_accumulation_rounding(out.cpu(), ref_f32, ref16, x.cpu(), weight.to("cpu"))


def test_small_integer_sums_are_bit_exact():
    """Products and sums of small integers are exact in float32: the kernel must reproduce them bit for bit
    (this catches a wrong code, slice or chunk anywhere, which a tolerance could hide at large K). On a GPU too:
    a chunk's partial sums stay below 2**13, exact in the tensor cores' accumulator, and chunks add in float32."""
    for bits, K in ((4, 640), (2, 300)):
        weight = make_weight(48, K, bits, seed=bits)
        x = torch.randint(-8, 9, (19, K), generator=torch.Generator().manual_seed(K)).float().to(E4M3).to(DEVICE)
        ones = torch.ones(48, dtype=torch.float32, device=DEVICE)
        for swap in (False, True):
            # float16 output (|sums| <= 7 * 8 * K rounds above 2048): the interpreter casts float32 -> bfloat16 by
            # truncation, the GPU to nearest even
            out = fp8_lowbit_linear(x, weight, ones, None, torch.float16, swap=swap)
            exact = x.cpu().float() @ weight.to("cpu").codes().float().T
            assert torch.equal(out.cpu(), exact.half()), (bits, swap)


def test_every_code_and_slice_position_unpacks_exactly():
    """One-hot activations read the weight back column by column: every slice of every chunk, all codes."""
    for bits in (4, 2):
        qmax = 2 ** (bits - 1) - 1
        K = 256
        q = (torch.arange(40 * K).reshape(40, K) % (2 * qmax + 1) - qmax).to(torch.int8)
        weight = PackedWeight.from_codes(q, torch.ones(40), bits).to(DEVICE)
        x = torch.eye(K).to(E4M3).to(DEVICE)
        out = fp8_lowbit_linear(x, weight, torch.ones(40, device=DEVICE), None, torch.float16, swap=False)
        assert torch.equal(out.cpu(), q.T.half()), bits


def test_bf16_output_and_transposed_input():
    weight = make_weight(32, 200, 4)
    x = make_x(64, 200).T.contiguous().T  # column-major view: copied to row-major by the wrapper
    out_scale = weight.scale.float()
    out = fp8_lowbit_linear(x, weight, out_scale, None, torch.bfloat16)
    ref_f32, ref = reference_linear(x.cpu(), weight.to("cpu"), out_scale.cpu(), None, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_within_accumulation_rounding(out.cpu(), ref_f32, ref, x.cpu(), weight.to("cpu"))


def test_custom_op_and_fake_shape():
    import kernels.ops  # noqa: F401

    weight = make_weight(24, 130, 2)
    x = make_x(5, 130)
    out_scale = weight.scale.float()
    bias = torch.randn(24, device=DEVICE)
    y = torch.ops.mixdq.fp8_lowbit_linear(x, weight.data, out_scale, bias, 2, 130, torch.float16)
    assert torch.equal(y, fp8_lowbit_linear(x, weight, out_scale, bias, torch.float16))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.ops.mixdq.fp8_lowbit_linear(
            torch.empty(7, 130, dtype=E4M3), torch.empty(24, 64, dtype=torch.uint8), torch.empty(24), None, 2, 130,
            torch.bfloat16,
        )  # fmt: skip
        assert fake.shape == (7, 24) and fake.dtype == torch.bfloat16


def test_package_function_matches_kernel_and_reference_backend():
    import kernels

    weight = make_weight(40, 256, 4)
    x = make_x(9, 256)
    out_scale = weight.scale.float()
    y_triton = kernels.fp8_lowbit_linear(x, weight, out_scale, backend="triton")
    y_torch = kernels.fp8_lowbit_linear(x.cpu(), weight.to("cpu"), out_scale.cpu(), backend="torch")
    torch.testing.assert_close(y_triton.cpu().float(), y_torch.float(), rtol=2**-10, atol=0)


def test_rejects_bad_inputs():
    weight = make_weight(16, 128, 4)
    x, scale = make_x(4, 128), weight.scale.float()
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_lowbit_linear(x.float(), weight, scale)
    with pytest.raises(ValueError, match="in_features=128"):
        fp8_lowbit_linear(make_x(4, 64), weight, scale)
    with pytest.raises(ValueError, match="out_scale"):
        fp8_lowbit_linear(x, weight, scale.half())
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_lowbit_linear(x, weight, scale, out_dtype=torch.float32)
    q8, s8 = reference.quantize_weight(torch.randn(16, 128), 8)
    with pytest.raises(ValueError, match="8 bits"):
        fp8_lowbit_linear(x, PackedWeight.from_codes(q8, s8, 8).to(DEVICE), scale)
    q, s = reference.quantize_weight(torch.randn(16, 128), 4)
    with pytest.raises(ValueError, match="k_split=40"):
        fp8_lowbit_linear(x, PackedWeight.from_codes(q, s.expand(2, -1), 4, k_split=40).to(DEVICE), scale)


def test_tiles_step_whole_chunks_and_fit_wgmma():
    """BLOCK_K whole 128-code chunks (one unpack per chunk); wgmma's 64-row side on the MMA's left operand:
    x's BLOCK_M, or the weight's BLOCK_N when swapped. Swapping is for few tokens only."""
    for config in get_fp8_lowbit_autotune_config():
        kw = config.kwargs
        assert kw["BLOCK_K"] % 128 == 0
        if os.environ.get("TRITON_INTERPRET") != "1":
            assert (kw["BLOCK_N"] if kw["SWAP"] else kw["BLOCK_M"]) >= 64, config
    assert swap_ab(77) and not swap_ab(256)
