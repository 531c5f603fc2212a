"""FP8 e4m3 for W8A8 linear layers: the grid, the fake-quant layer, the config, and deploy (CPU paths).

On the CPU a deployed FP8 layer runs either the dequantize-and-multiply reference or ``torch._scaled_mm``
(``backend="triton"``: the call cuBLAS FP8 makes on a GPU, which torch also implements on the CPU).
"""

import pytest
import torch
from torch import nn

from kernels import fp8
from mixdq.calibrate import calibrate
from mixdq.config import ConfigError, PrecisionConfig
from mixdq.deploy import DeployedFP8CodesLinear, DeployedFP8Linear, deploy, deploy_layer
from mixdq.inventory import layer_inventory
from mixdq.quant import quant_layers, quantize_
from mixdq.quant.primitives import fake_quantize_act_fp8, fake_quantize_weight_fp8, fp8_act_qparams
from tests.test_deploy import CALIBRATION_PROMPTS, fake_quant_layer, generate


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    return float(10 * torch.log10(x.square().sum() / (xq - x).square().sum()))


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3fn value, sorted (from the 256 bit patterns)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8.FP8_DTYPE).float()
    return values[values.isfinite()].unique()


def test_weight_codes_lie_on_the_e4m3_grid_with_the_max_at_448():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    codes, scale = fp8.quantize_fp8_weight(w)
    assert codes.dtype == fp8.FP8_DTYPE and scale.dtype == torch.float32 and scale.dim() == 0
    assert float(scale) == pytest.approx(float(w.abs().max()) / 448, rel=1e-6)
    assert float(codes.float().abs().max()) == 448.0
    assert torch.isin(codes.float(), e4m3_grid()).all()
    # round to nearest: each value is within half a grid step of its code (relative 2^-4 for normals)
    normal = w.abs() / scale >= 2**-6
    err = (codes.float() * scale - w).abs()[normal] / w.abs()[normal]
    assert float(err.max()) <= 2**-4 + 1e-6


def test_activation_quantizer_is_symmetric_clips_and_never_makes_nan():
    act_range = torch.tensor([[-3.0, 12.0]])
    scale, inv_scale = fp8_act_qparams(act_range)
    assert float(scale[0]) == pytest.approx(12.0 / 448)
    x = torch.tensor([-1e6, -3.0, 0.0, 1e-9, 12.0, 50.0, 1e6])
    y = fake_quantize_act_fp8(x, scale[0], inv_scale[0])
    assert not y.isnan().any()
    assert y[0] == -12.0 and y[-1] == 12.0 and y[-2] == 12.0  # clipped to +-absmax, not NaN (e4m3fn has no inf)
    assert y[2] == 0.0
    assert float(y[1]) == pytest.approx(-3.0, rel=2**-4)


def test_fp8_keeps_outlier_heavy_activations_better_than_int8_and_gaussian_weights_worse():
    """Why FP8 needs its own fake-quant: its error profile is not int8's (numbers from the two quantizers)."""
    from mixdq.quant.primitives import fake_quantize_act, fake_quantize_weight, weight_scales

    torch.manual_seed(1)
    w = torch.randn(256, 512)
    w_int8 = fake_quantize_weight(w, weight_scales(w)[8], 8)
    w_fp8 = fake_quantize_weight_fp8(w)
    assert sqnr_db(w, w_int8) > sqnr_db(w, w_fp8) + 5  # per-channel int8 ~40 dB vs e4m3 ~31 dB on Gaussians
    x = torch.randn(4096)
    x[:4] = 200.0  # a few large outliers stretch the range
    act_range = torch.stack(torch.aminmax(x)).view(1, 2)
    x_int8 = fake_quantize_act(x, act_range[0], 8)
    scale, inv = fp8_act_qparams(act_range)
    x_fp8 = fake_quantize_act_fp8(x, scale[0], inv[0])
    assert sqnr_db(x, x_fp8) > sqnr_db(x, x_int8) + 10


@torch.no_grad()
def test_fake_quant_layer_switches_grid_with_the_fp8_flag():
    torch.manual_seed(2)
    x = torch.randn(4, 7, 64)
    layer = fake_quant_layer(nn.Linear(64, 48), 8, 8, x)
    int8_out = layer(x).clone()
    layer.fp8 = True
    fp8_out = layer(x)
    scale, inv_scale = fp8_act_qparams(layer.act_range(8))
    x_fp8 = fake_quantize_act_fp8(x, scale[0], inv_scale[0])
    expected = nn.functional.linear(x_fp8, fake_quantize_weight_fp8(layer.fp_module.weight), layer.fp_module.bias)
    torch.testing.assert_close(fp8_out, expected, rtol=0, atol=0)
    assert not torch.equal(fp8_out, int8_out)
    layer.set_act_range(4, layer.act_range(8))
    layer.act_bits = 4  # FP8 replaces a side only at 8 bits: int4 activations stay int4
    assert layer._act_zero_point is not None and layer._act_zero_point.dtype == torch.int32
    layer.fp8 = False
    layer.act_bits = 8
    torch.testing.assert_close(layer(x), int8_out, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bos_aware", [False, True])
def test_deployed_fp8_linear_matches_its_fake_quant_layer(backend, bos_aware):
    """backend='triton' runs torch._scaled_mm (cuBLAS FP8's call); 'torch' the dequantize reference."""
    torch.manual_seed(3)
    x = torch.randn(3, 10, 64)
    if bos_aware:
        x[:, 0] = 25 * torch.randn(64)
    layer = fake_quant_layer(nn.Linear(64, 32), 8, 8, x, bos_aware=bos_aware)
    layer.fp8 = True
    ref = layer(x)
    deployed = deploy_layer(layer, backend=backend)
    assert isinstance(deployed, DeployedFP8Linear) and deployed.precision == "W8A8 FP8"
    assert deployed.qweight.dtype == torch.uint8 and deployed.qweight.numel() == 64 * 32
    y = deployed(x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    if bos_aware:  # token 0 is the full-precision row
        torch.testing.assert_close(y[:, 0], layer.fp_module(x[:, 0]), rtol=1e-6, atol=1e-6)
    scales = [getattr(deployed, name).clone() for name in DeployedFP8Linear.SCALES]
    deployed.half()  # e4m3 codes and float32 scales survive a dtype cast of the model, bit for bit
    assert deployed.qweight.dtype == torch.uint8
    for name, before in zip(DeployedFP8Linear.SCALES, scales):
        after = getattr(deployed, name)
        assert after.dtype == torch.float32 and after.dim() == 0 and torch.equal(after, before)
        assert after._base is None  # its own tensor: Inductor's CUDA _scaled_mm lowering rejected bit-cast views
    assert deployed.bias.dtype == torch.float16
    y16 = deployed(x.half())
    assert y16.dtype == torch.float16


@torch.no_grad()
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deployed_low_bit_fp8_linear_keeps_its_integer_weight_and_matches_fake_quant(bits, backend):
    """A W4A8 / W2A8 layer in the fp8 list: the weight keeps its per-channel integer grid (packed, same bytes
    as int8-activation W4A8), only the activations move to e4m3. backend='triton' runs the Triton unpacking to
    e4m3 and torch._scaled_mm with row-wise scales (the cuBLAS FP8 call; torch implements it on the CPU too)."""
    torch.manual_seed(5)
    x = torch.randn(3, 10, 256)
    x[..., 7] *= 30  # an outlier channel: e4m3 and int8 activations differ visibly
    layer = fake_quant_layer(nn.Linear(256, 48), bits, 8, x)
    int8_ref = layer(x)
    layer.fp8 = True
    ref = layer(x)
    assert not torch.allclose(ref, int8_ref, rtol=1e-3, atol=1e-3)  # the activation grid did change
    # the fake-quant weight is still the integer grid: FP8 does not touch a 4- / 2-bit weight
    layer.fp8 = False
    weight_int = layer._fake_quant_weight().clone()
    layer.fp8 = True
    assert torch.equal(layer._fake_quant_weight(), weight_int)
    deployed = deploy_layer(layer, backend=backend)
    assert isinstance(deployed, DeployedFP8CodesLinear) and deployed.precision == f"W{bits}A8 FP8"
    assert deployed.qweight.dtype == torch.uint8 and deployed.qweight.shape[1] == 256 * bits // 8
    assert deployed.resolved_backend() == ("unpack + cuBLAS FP8" if backend == "triton" else "torch")
    y = deployed(x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    deployed.half()  # scales stay float32 (cuBLAS FP8 takes nothing else), bias goes FP16
    for name in DeployedFP8CodesLinear.SCALES:
        assert getattr(deployed, name).dtype == torch.float32
    assert deployed.bias.dtype == torch.float16 and deployed(x.half()).dtype == torch.float16


@torch.no_grad()
@pytest.mark.parametrize("fast_accum", [False, True])
def test_rowwise_call_takes_a_cached_ones_column_and_the_precomputed_out_scale(monkeypatch, fast_accum):
    """The row-wise recipe without a kernel per call for its scales: scale_a is a view of one cached column of
    ones (any M), scale_b the layer's precomputed weight x activation scale, and fast accumulation is passed
    through when deployed with it; the output is the reference path's. (An (M, 1) column made per call was
    ~0.3-0.5 ms of small kernels per SDXL step on an H200.)"""
    calls = []

    def recording_scaled_mm(a, b, scale_a, scale_b, **kwargs):
        calls.append((scale_a, scale_b, kwargs))
        return real_scaled_mm(a, b, scale_a, scale_b, **kwargs)

    real_scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", recording_scaled_mm)
    torch.manual_seed(8)
    x = torch.randn(2, 9, 64)
    layer = fake_quant_layer(nn.Linear(64, 32), 4, 8, x)
    layer.fp8 = True
    reference = deploy_layer(layer, backend="torch")
    deployed = deploy_layer(layer, backend="triton", fp8_fast_accum=fast_accum)
    assert deployed.fast_accum is fast_accum and not reference.fast_accum
    fast_name = "unpack + cuBLAS FP8 (fast accumulation)" if fast_accum else "unpack + cuBLAS FP8"
    assert deployed.resolved_backend() == fast_name and reference.resolved_backend() == "torch"
    for tokens in (x, x[:, :4]):
        y = deployed(tokens)
        scale_a, scale_b, kwargs = calls[-1]
        rows = tokens.shape[0] * tokens.shape[1]
        assert scale_a.shape == (rows, 1) and bool((scale_a == 1).all()) and scale_a.dtype == torch.float32
        assert scale_a.untyped_storage().data_ptr() == fp8.ones_column(1, x.device).untyped_storage().data_ptr()
        assert torch.equal(scale_b, (deployed.weight_scale * deployed.act_scale).reshape(1, -1))
        assert kwargs["use_fast_accum"] is fast_accum
        want = reference(tokens)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert len(calls) == 2


def test_ones_column_is_a_view_of_one_cached_column_and_grows_on_demand():
    device = torch.device("cpu")
    first, again = fp8.ones_column(7, device), fp8.ones_column(3, device)
    assert first.shape == (7, 1) and again.shape == (3, 1) and first.dtype == torch.float32
    assert first.data_ptr() == again.data_ptr() and bool((first == 1).all())
    huge = fp8.ones_column(fp8.ONES_ROWS + 5, device)  # more rows than the cache: a longer cached column
    assert huge.shape == (fp8.ONES_ROWS + 5, 1) and bool((huge == 1).all())
    assert fp8.ones_column(2, device).data_ptr() == huge.data_ptr()


def test_rowwise_scaled_mm_reads_one_scale_per_row_and_column():
    """The call the low-bit FP8 path makes: a (M, 1) and a (1, N) float32 scale, FP16 output with bias."""
    torch.manual_seed(6)
    a = torch.randn(5, 32).to(fp8.FP8_DTYPE)
    codes = torch.randint(-8, 8, (16, 32)).float().to(fp8.FP8_DTYPE)
    sa, sb = torch.rand(5, 1) + 0.5, torch.rand(1, 16) + 0.5
    bias = torch.randn(16).half()
    y = torch._scaled_mm(a, codes.t(), sa, sb, bias=bias, out_dtype=torch.float16)
    ref = (a.float() * sa) @ (codes.float() * sb.t()).t() + bias.float()
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)


@torch.no_grad()
def test_scaled_mm_gets_the_operand_layouts_cublas_requires(monkeypatch):
    """On CUDA, _scaled_mm wants a row-major left and a column-major right operand (the CPU accepts any), and
    diffusers' proj_in input is an NCHW tensor permuted to tokens-last: a column-major view (an H200 run
    failed on exactly this). The layout rule is checked here as torch's CUDA meta function states it."""
    calls = []

    def checked_scaled_mm(a, b, *args, **kwargs):
        calls.append(1)
        assert a.stride(0) > a.stride(1) and a.stride(1) == 1, f"self must be row_major, got stride {a.stride()}"
        assert b.stride(0) == 1 and b.stride(1) > 1, f"mat2 must be col_major, got stride {b.stride()}"
        return real_scaled_mm(a, b, *args, **kwargs)

    real_scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm)
    torch.manual_seed(4)
    nchw = torch.randn(1, 64, 6, 8)
    tokens = nchw.permute(0, 2, 3, 1).reshape(1, 48, 64)  # what Transformer2DModel.proj_in receives
    assert tokens.stride(-1) != 1
    layer = fake_quant_layer(nn.Linear(64, 32), 8, 8, tokens)
    layer.fp8 = True
    ref = layer(tokens)
    y = deploy_layer(layer, backend="triton")(tokens)
    assert calls
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_config_fp8_list_is_validated_round_trips_and_blocks_yaml(random_pipe):
    layers = layer_inventory(random_pipe.unet)
    config = PrecisionConfig.uniform(layers, 8, 8)
    with_fp8 = config.with_fp8_linears(layers)
    linears = [i.name for i in layers if i.kind == "linear"]
    assert with_fp8.fp8 == linears and config.fp8 == []
    assert PrecisionConfig.from_json(with_fp8.to_json()).fp8 == linears
    conv = next(i.name for i in layers if i.kind == "conv")
    with pytest.raises(ConfigError, match="linear layers only"):
        PrecisionConfig(weight_bits=config.weight_bits, act_bits=config.act_bits, fp8=[conv]).validate(layers)
    w4 = PrecisionConfig.uniform(layers, 4, 8)
    PrecisionConfig(weight_bits=w4.weight_bits, act_bits=w4.act_bits, fp8=linears[:1]).validate(layers)  # W4A8 ok
    assert w4.with_fp8_linears(layers).fp8 == []  # nothing at W8A8
    assert w4.with_fp8_linears(layers, low_bit=True).fp8 == linears  # e4m3 activations, int4 weights
    w4a16 = PrecisionConfig.uniform(layers, 4, None)
    with pytest.raises(ConfigError, match="W4A16"):
        PrecisionConfig(weight_bits=w4a16.weight_bits, fp8=linears[:1]).validate(layers)
    assert w4a16.with_fp8_linears(layers, low_bit=True).fp8 == []  # no 8-bit side to change
    with pytest.raises(ConfigError, match="no FP8"):
        with_fp8.to_mixdq_yaml(layers)


@torch.no_grad()
@pytest.mark.parametrize("weight_bits,low_bit", [(8, False), (4, True)])
def test_deployed_fp8_pipeline_matches_its_fake_quant_pipeline(fresh_random_pipe, weight_bits, low_bit):
    """quantize_ carries the fp8 list into the layers; deploy builds FP8 linears (W8A8: e4m3 weights; W4A8 with
    low_bit: packed int4 codes, e4m3 activations) and int8 convs from it, and runs what was simulated."""
    pipe = fresh_random_pipe
    pipe.set_progress_bar_config(disable=True)
    ranges = calibrate(
        pipe, CALIBRATION_PROMPTS, num_inference_steps=1, height=64, width=64, act_bits=(8,), progress=False
    )
    layers = layer_inventory(pipe.unet)
    int8_config = PrecisionConfig.uniform(layers, weight_bits, 8)
    config = int8_config.with_fp8_linears(layers, low_bit=low_bit)
    assert config.fp8 == [i.name for i in layers if i.kind == "linear"]
    quantize_(pipe, config, ranges)
    fake = quant_layers(pipe)
    assert {n for n, q in fake.items() if q.fp8} == set(config.fp8)
    fake_images = generate(pipe)
    quantize_(pipe, int8_config, ranges)
    int8_images = generate(pipe)
    quantize_(pipe, config, ranges)
    report = deploy(pipe)
    precisions = {r.name: r.precision for r in report.layers}
    assert {precisions[n] for n in config.fp8} == {f"W{weight_bits}A8 FP8"}
    assert {p for n, p in precisions.items() if n not in config.fp8} == {f"W{weight_bits}A8"}  # convs stay int8
    deployed_type = DeployedFP8Linear if weight_bits == 8 else DeployedFP8CodesLinear
    assert isinstance(pipe.unet.get_submodule(config.fp8[0]), deployed_type)
    images = generate(pipe)
    psnr = 10 * torch.log10(1.0 / (images - fake_images).pow(2).mean()).item()
    psnr_int8 = 10 * torch.log10(1.0 / (int8_images - fake_images).pow(2).mean()).item()
    print(f"deployed W{weight_bits}A8 FP8 vs its fake-quant: {psnr:.1f} dB; vs int8 activations: {psnr_int8:.1f} dB")
    assert psnr > 50.0 and psnr > psnr_int8 + 10  # it runs what was simulated, not int8


@torch.no_grad()
def test_fp8_linear_and_dequant_conv_trace_as_one_graph():
    """torch.compile(fullgraph=True) traces deployed FP8 linears (W8A8 and W4A8, on their _scaled_mm paths) and
    a dequantizing conv without graph breaks, and the traced graph computes what eager computes."""
    from tests.test_deploy import fake_quant_layer as make

    torch.manual_seed(6)
    tokens, img = torch.randn(2, 12, 64), torch.randn(1, 8, 6, 6)
    fp8_layer = make(nn.Linear(64, 32), 8, 8, tokens)
    fp8_layer.fp8 = True
    linear = deploy_layer(fp8_layer, backend="triton")
    low_bit_layer = make(nn.Linear(32, 48), 4, 8, torch.randn(2, 12, 32))
    low_bit_layer.fp8 = True
    low_bit = deploy_layer(low_bit_layer, backend="triton")  # Triton unpacking to e4m3 + row-wise _scaled_mm
    assert isinstance(low_bit, DeployedFP8CodesLinear)
    conv = deploy_layer(make(nn.Conv2d(8, 16, 3, padding=1), 4, 8, img), conv_path="dequant")

    def block(tokens, img):
        return low_bit(linear(torch.nn.functional.gelu(tokens))), conv(torch.nn.functional.silu(img))

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(tokens, img), block(tokens, img)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
