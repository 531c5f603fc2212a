"""``deploy``: turn a fake-quant UNet into real packed-integer layers that run on :mod:`kernels`.

Fake quantization (:mod:`mixdq.quant`) keeps every FP weight and only simulates rounding, so it saves no
memory and is slower than FP16. ``deploy`` makes the chosen precision real, in place:

* a layer with quantized weights becomes a :class:`DeployedLinear` / :class:`DeployedConv2d` holding the
  integer codes packed along K (int8, two int4 or four int2 per byte, :class:`kernels.PackedWeight`), one
  float32 scale and (for the A8 epilogue) one int32 row sum per output channel and input part (a split
  up-block ``conv_shortcut`` has two parts, each with its own weight scales, as MixDQ's two weight quantizers),
  the bias, and the static activation scale / zero-point of each input part. Its ``forward`` takes one of two paths, the faster one
  for the layer by default (``linear_path`` / ``conv_path``, :mod:`mixdq.deploy.policy`): the integer GEMM
  (``kernels.quant_linear`` / ``kernels.conv2d_quant``: Triton on CUDA, the PyTorch integer reference
  elsewhere), by default for W8A8 linears; or the dequant path (:mod:`kernels.dequant`: the packed weight
  unpacked per call, a float matmul / conv on the A8-rounded input), by default for convs, packed int4 /
  int2 linears and weight-only linears;
* a W8A8 linear layer of the config's ``fp8`` list becomes a :class:`DeployedFP8Linear` (e4m3 codes, cuBLAS
  FP8 through ``torch._scaled_mm`` on GPUs of compute capability 8.9+); a W4A8 / W2A8 one a
  :class:`DeployedFP8CodesLinear` (packed integer codes unpacked to e4m3 per call, row-wise scaled cuBLAS FP8);
* a layer with FP weights but quantized activations (``W16A8``) stays a :class:`~mixdq.quant.QuantLayer`:
  there is no integer kernel for a float weight, and int8-activation x FP16-weight is exactly what the fake
  path computes (quantize, dequantize, FP16 matmul); it keeps its FP weights, as the accounting assumes;
* a layer with neither quantized goes back to the plain ``nn.Linear`` / ``nn.Conv2d``.

The codes are the ones the fake-quant layer uses (same scales, same :func:`~mixdq.quant.primitives.quantize_weight`)
and the kernels quantize activations with ``round(x * (1 / scale))`` like the fake path, so a deployed layer
matches its fake-quant layer up to float rounding of the accumulation and the kernels' 16-bit output.

BOS-aware cross-attention ``to_k`` / ``to_v`` (MixDQ): token 0 of the text embedding is the BOS hidden state,
the same for every prompt, and its K/V rows are computed in full precision. The fake layer computes them on
demand; a deployed layer cannot (its FP weights are gone), so ``deploy`` precomputes them before freeing:
for the token-0 vectors the fake layer already cached (calibration, earlier generations), the BOS state of the
pipeline's own text encoders (one encode of the empty prompt), and the all-zeros vector (the negative
embedding of ``force_zeros_for_empty_prompt`` under guidance). At run time token 0 is matched to the nearest
cached vector within :data:`BOS_MATCH_RTOL` (the same vector from another batch size or kernel may differ in
the last bits); a vector that matches none is an error, never a silent low-precision fallback.
"""

from mixdq.deploy.api import LAYER_CLASSES, DeployedLayerReport, DeployReport, deploy, deploy_layer, layer_class
from mixdq.deploy.bos import BOS_MATCH_RTOL, BosCacheMissError
from mixdq.deploy.compile import REPEATED_BLOCKS, STAGES, compile_repeated_blocks
from mixdq.deploy.fuse import fuse_qkv_projections
from mixdq.deploy.layers import (
    DEPLOYED_TYPES,
    DeployedConv2d,
    DeployedFP8CodesLinear,
    DeployedFP8Linear,
    DeployedLinear,
    PackedLayer,
)
from mixdq.deploy.policy import (
    CONV_PATHS,
    DEFAULT_CONV_PATH,
    DEFAULT_LINEAR_PATH,
    LINEAR_PATHS,
    DeployOptions,
    auto_linear_path,
    check_deployable,
    check_linear_path,
    linear_path_for,
)
from mixdq.deploy.unpack_groups import group_unpacking, grouped_blocks, ungroup_unpacking

__all__ = [
    "BOS_MATCH_RTOL",
    "CONV_PATHS",
    "DEFAULT_CONV_PATH",
    "DEFAULT_LINEAR_PATH",
    "DEPLOYED_TYPES",
    "LAYER_CLASSES",
    "LINEAR_PATHS",
    "REPEATED_BLOCKS",
    "STAGES",
    "BosCacheMissError",
    "DeployOptions",
    "DeployReport",
    "DeployedConv2d",
    "DeployedFP8CodesLinear",
    "DeployedFP8Linear",
    "DeployedLayerReport",
    "DeployedLinear",
    "PackedLayer",
    "auto_linear_path",
    "check_deployable",
    "check_linear_path",
    "compile_repeated_blocks",
    "deploy",
    "deploy_layer",
    "fuse_qkv_projections",
    "group_unpacking",
    "grouped_blocks",
    "layer_class",
    "linear_path_for",
    "ungroup_unpacking",
]
