"""Quantized checkpoints: save a deployed pipeline once, load it anywhere without its FP16 UNet weights.

A checkpoint folder is a diffusers pipeline folder whose UNet holds what :func:`mixdq.deploy.deploy` made::

    model_index.json, scheduler/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/   (diffusers)
    unet/config.json                     the UNet's diffusers config (its architecture)
    unet/mixdq_quantized.safetensors     every tensor of the deployed UNet
    unet/mixdq_manifest.json             format and library version, model identity, PrecisionConfig, run
                                         options, and per layer and tensor what the file must hold

The tensor file holds exactly what the deployed layers hold as buffers -- packed codes in the kernels' planar
layout (:mod:`kernels.pack`), weight scales, int32 row sums, activation quantizers ``(1 / s, zp, s)`` (the
calibrated activation ranges as the kernels use them), FP8 scales, BOS K/V caches, biases -- under
``<layer>.<buffer>``; activation-only (W16A8) layers their FP weight and calibrated ``act_range_<bits>``; and the
rest of the UNet (norms, embeddings, FP16 layers) under its ``state_dict`` names. The FP16 weights of
quantized layers are not in it: loading builds the UNet on the meta device, fills each quantized layer with a
deployed module made from the file (:data:`LAYER_SCHEMAS` says which tensors each class holds) and assigns the
rest, so the FP16 UNet is never materialized.

Safety: safetensors only (no pickle, nothing executes on load); the manifest and configs are read through
:mod:`mixdq.config_io`'s bounded readers; every tensor's dtype, shape and SHA-256 are checked against the
manifest, and shapes against the architecture, before anything is built; a bad file raises one
:class:`CheckpointError` line naming the file and tensor. :func:`load_quantized` returns a new pipeline and
touches no live one.

UNets with fused q/k/v projections (:func:`mixdq.deploy.fuse_qkv_projections`) or compiled blocks are refused
at save time: save the deployed UNet first, fuse and compile after loading (both are cheap and deterministic).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import kernels
from kernels.pack import PACK_CHUNK
from mixdq.config import ACT_BITS, PrecisionConfig
from mixdq.config_io import ConfigError, parse_json, quote, read_text
from mixdq.deploy.api import DeployReport, layer_class, layer_kind
from mixdq.deploy.layers import (
    DEPLOYED_TYPES,
    DeployedConv2d,
    DeployedFP8CodesLinear,
    DeployedFP8Linear,
    DeployedLinear,
    PackedLayer,
)
from mixdq.deploy.policy import CONV_PATHS
from mixdq.inventory import LayerInfo, inventory_fingerprint, layer_inventory
from mixdq.models import PROMPT_LANGUAGE_FILE, prompt_language
from mixdq.quant.api import unet_of
from mixdq.quant.layers import QuantLayer, QuantMode
from mixdq.version import __version__

FORMAT_NAME = "mixdq-studio/quantized-checkpoint"
FORMAT_VERSION = 1
UNET_FOLDER = "unet"
TENSOR_FILE = "mixdq_quantized.safetensors"
MANIFEST_FILE = "mixdq_manifest.json"
# a safetensors header larger than this is refused before it is read (the safetensors library's own limit)
MAX_HEADER_BYTES = 100 * 1024 * 1024
# hex digits of each tensor's SHA-256 kept in the manifest: 128 bits find any corruption, in half the text
SHA_CHARS = 32

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = {str(d).removeprefix("torch."): d for d in (*_FLOATS, torch.int8, torch.uint8, torch.int32, torch.int64)}
# safetensors' dtype names
_SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64,
}  # fmt: skip


class CheckpointError(ConfigError):
    """A quantized checkpoint that cannot be loaded: one line naming the file, the tensor and the defect."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a deployed layer class holds: its buffer name, allowed dtypes, and which axes must equal the
    replaced layer's ``out`` / ``in`` features (the rest of the shape is recorded at save time, not fixed here)."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    axes: tuple[tuple[int, str], ...] = ()
    optional: bool = False  # a ``None`` buffer (no bias, no activation quantizer, not BOS-aware)


_PACKED = (
    TensorSpec("qweight", (torch.int8, torch.uint8), ((0, "out"),)),
    TensorSpec("weight_scale", _FLOATS, ((-1, "out"),)),
    TensorSpec("weight_rowsum", (torch.int32,), ((-1, "out"),)),
    TensorSpec("bias", _FLOATS, ((0, "out"),), optional=True),
    TensorSpec("act_qparams_t", (torch.int32,), ((0, "3"),), optional=True),
)
_BOS = (
    TensorSpec("bos_inputs", _FLOATS, ((-1, "in"),), optional=True),
    TensorSpec("bos_outputs", _FLOATS, ((-1, "out"),), optional=True),
)
_FP8_SCALES = (
    TensorSpec("act_scale", (torch.float32,)),
    TensorSpec("act_inv_scale", (torch.float32,)),
    TensorSpec("out_scale", (torch.float32,)),
)
# deployed layer class -> the tensors its instances hold as buffers (the checkpoint's per-layer schema)
LAYER_SCHEMAS: dict[type[nn.Module], tuple[TensorSpec, ...]] = {
    DeployedLinear: _PACKED + _BOS,
    DeployedConv2d: _PACKED,
    DeployedFP8CodesLinear: _PACKED + _FP8_SCALES + _BOS,
    DeployedFP8Linear: (
        TensorSpec("qweight", (torch.uint8,), ((0, "out"), (1, "in"))),
        TensorSpec("weight_scale", (torch.float32,)),
        *_FP8_SCALES,
        TensorSpec("bias", _FLOATS, ((0, "out"),), optional=True),
        *_BOS,
    ),
}
_CLASSES = {cls.__name__: cls for cls in LAYER_SCHEMAS}
# activation-only layers stay fake-quant QuantLayers (FP weight, calibrated range, BOS cache)
_QUANT_LAYER = "QuantLayer"
_QUANT_LAYER_EXTRAS = (
    *(TensorSpec(f"act_range_{bits}", (torch.float32,), optional=True) for bits in ACT_BITS),
    *_BOS,
)


# ---- save ------------------------------------------------------------------------------------------------------
def _contiguous_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().clone()  # own storage: safetensors refuses shared tensors


def _sha256(tensor: torch.Tensor) -> str:
    data = tensor.contiguous().view(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(data.numpy().data).hexdigest()


def _check_saveable(unet: nn.Module, config: PrecisionConfig, layers: list[LayerInfo]) -> None:
    """Refuse what a checkpoint cannot describe: a UNet not deployed, fused, compiled, or not of ``config``."""
    if not any(isinstance(m, DEPLOYED_TYPES) for m in unet.modules()):
        raise ValueError("the UNet is not deployed; run mixdq.deploy(pipe, config, act_ranges) before saving it.")
    if any(getattr(m, "fused_projections", False) for m in unet.modules()):
        raise ValueError(
            "the UNet has fused q/k/v projections; save the deployed UNet before fuse_qkv_projections and fuse "
            "again after loading (fusing is cheap and gives the same numbers)."
        )
    if any("_orig_mod" in name for name, _ in unet.named_modules()):
        raise ValueError("the UNet has torch.compile'd blocks; save before compiling and compile after loading.")
    config.validate(layers)
    for info in layers:
        module = unet.get_submodule(info.name)
        want = (config.layer_weight_bits(info.name), config.layer_act_bits(info.name))
        if isinstance(module, DEPLOYED_TYPES):
            held = (module.weight_bits, module.act_bits)
            fp8 = isinstance(module, (DeployedFP8Linear, DeployedFP8CodesLinear))
        elif isinstance(module, QuantLayer):
            held, fp8 = (None, module.act_bits), module.fp8
        else:
            held, fp8 = (None, None), False
        if held != want or fp8 != config.layer_fp8(info.name):
            raise ValueError(
                f"layer {info.name!r} holds W{held[0] or 16}A{held[1] or 16}{' FP8' if fp8 else ''} but the config "
                "says otherwise; save with the config the UNet was deployed with."
            )


def _unique(values: set, what: str) -> Any:
    if len(values) > 1:
        raise ValueError(f"deployed layers disagree on {what} ({sorted(map(str, values))}); deploy with one setting.")
    return next(iter(values), None)


@torch.no_grad()
def _unet_tensors(unet: nn.Module, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Every tensor to save, by key, and the manifest's per-layer table (deployed and activation-only layers)."""
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, dict[str, Any]] = {}
    skip: set[str] = set()
    modules = list(unet.named_modules())
    for name, module in tqdm(modules, desc="collecting tensors", disable=not progress):
        if isinstance(module, DEPLOYED_TYPES):
            specs = LAYER_SCHEMAS[type(module)]
            entry = {"class": type(module).__name__, "bos_aware": getattr(module, "bos_inputs", None) is not None}
            entry["path"] = getattr(module, "linear_path", None) or getattr(module, "conv_path", None)
        elif isinstance(module, QuantLayer):
            specs = _QUANT_LAYER_EXTRAS
            entry = {"class": _QUANT_LAYER, "bos_aware": module.bos_aware, "path": None}
            skip.add(f"{name}.fp_module.")
            for key, value in module.fp_module.state_dict().items():
                tensors[f"{name}.{key}"] = _contiguous_cpu(value)
        else:
            continue
        table[name] = entry
        for spec in specs:
            value = _layer_tensor(module, spec.name)
            if value is not None:
                tensors[f"{name}.{spec.name}"] = _contiguous_cpu(value)
    for key, value in unet.state_dict().items():
        if key not in tensors and not any(key.startswith(prefix) for prefix in skip):
            tensors[key] = _contiguous_cpu(value)
    return tensors, table


def _layer_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    if isinstance(module, QuantLayer):  # its caches are private, non-persistent buffers
        if name.startswith("act_range_"):
            return module.act_range(int(name.removeprefix("act_range_")))
        return getattr(module, f"_{name}")
    return getattr(module, name)


def save_quantized(model: Any, config: PrecisionConfig, folder: str | Path, progress: bool = False) -> Path:
    """Write a deployed pipeline (or its UNet) as a quantized checkpoint folder (see the module docstring).

    ``config`` is the :class:`~mixdq.config.PrecisionConfig` it was deployed with: it is checked against every
    layer and stored in the manifest. A bare UNet writes only ``unet/``. Returns the folder.
    """
    from safetensors.torch import save_file

    unet = unet_of(model)
    layers = layer_inventory(unet)
    _check_saveable(unet, config, layers)
    folder = Path(folder)
    unet_dir = folder / UNET_FOLDER
    unet_dir.mkdir(parents=True, exist_ok=True)
    tensors, table = _unet_tensors(unet, progress)
    deployed = [m for m in unet.modules() if isinstance(m, DEPLOYED_TYPES)]
    fp8_layers = [m for m in deployed if isinstance(m, (DeployedFP8Linear, DeployedFP8CodesLinear))]
    dtype = next(p.dtype for p in unet.parameters() if p.is_floating_point())
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model_id": getattr(model, "model_id", "") or config.model_id,
        "fingerprint": inventory_fingerprint(layers),
        "dtype": str(dtype).removeprefix("torch."),
        "pack_chunk": PACK_CHUNK,
        "config": config.to_dict(),
        "options": {
            "backend": _unique({m.backend for m in deployed}, "backend"),
            "fp8_fast_accum": bool(_unique({m.fast_accum for m in fp8_layers}, "fp8_fast_accum")),
        },
        "layers": table,
        "tensors": {
            key: {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "sha256": _sha256(t)[:SHA_CHARS],
            }
            for key, t in tensors.items()
        },
    }
    save_file(tensors, str(unet_dir / TENSOR_FILE), metadata={"format": FORMAT_NAME})
    (unet_dir / MANIFEST_FILE).write_text(_manifest_json(manifest))
    unet.save_config(str(unet_dir))
    if model is not unet:
        _save_pipeline_parts(model, folder, progress)
    return folder


@torch.no_grad()
def export_checkpoint(
    pipe: Any,
    config: PrecisionConfig,
    act_ranges: Any,
    folder: str | Path,
    progress: bool = False,
    in_place: bool = False,
) -> tuple[Path, DeployReport]:
    """Deploy ``pipe``'s UNet with ``config`` (and ``act_ranges`` when it quantizes activations) and save it as a
    checkpoint folder; returns (folder, deploy report). What ``mixdq export`` and the studio's Export tab run.

    The saved UNet is deployed unfused and uncompiled (what :func:`save_quantized` accepts). With ``in_place``
    (a pipeline loaded for this export alone) ``pipe``'s own UNet is deployed, its FP16 weights dropped;
    otherwise a copy is, and ``pipe`` keeps its FP16 UNet (the studio goes on comparing against it).
    """
    import copy

    from mixdq.deploy.api import deploy
    from mixdq.deploy.runner import swapped_unet

    unet = unet_of(pipe) if in_place else copy.deepcopy(unet_of(pipe))
    with swapped_unet(pipe, unet):
        report = deploy(pipe, config, act_ranges)
        return save_quantized(pipe, config, folder, progress=progress), report


def _manifest_json(manifest: dict[str, Any]) -> str:
    """Readable and small: one line per top-level entry, per layer and per tensor."""
    lines = []
    for key, value in manifest.items():
        if key in ("layers", "tensors"):
            rows = [f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in value.items()]
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(rows) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _save_pipeline_parts(pipe: Any, folder: Path, progress: bool) -> None:
    """model_index.json and every component but the UNet, as diffusers' ``save_pretrained`` writes them."""
    pipe.save_config(str(folder))
    language = getattr(pipe, "prompt_language", None)
    if language is not None:  # the caption language travels with the model (mixdq.models.read_prompt)
        (folder / PROMPT_LANGUAGE_FILE).write_text(json.dumps({"language": language}, indent=2) + "\n")
    parts = [(name, part) for name, part in pipe.components.items() if name != UNET_FOLDER and part is not None]
    for name, part in tqdm(parts, desc="writing pipeline parts", disable=not progress):
        if isinstance(part, nn.Module):
            part.save_pretrained(str(folder / name), safe_serialization=True)
        else:
            part.save_pretrained(str(folder / name))


# ---- load ------------------------------------------------------------------------------------------------------
@dataclass
class _Manifest:
    data: dict[str, Any]
    config: PrecisionConfig
    dtype: torch.dtype
    source: str  # the manifest file as the user named it
    tensor_source: str  # the tensor file as the user named it


def _need(data: Any, key: str, kinds: type | tuple[type, ...], source: str) -> Any:
    value = data.get(key) if isinstance(data, dict) else None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        value = None
    if not isinstance(value, kinds):
        raise CheckpointError(f"{source}: {quote(key)} is missing or not of the expected type.")
    return value


def _read_manifest(folder: Path, name: str) -> _Manifest:
    """The manifest, checked for format, versions and structure (not yet against a model)."""

    source = f"{name}/{UNET_FOLDER}/{MANIFEST_FILE}"
    data = parse_json(read_text(folder / UNET_FOLDER / MANIFEST_FILE, source, "checkpoint manifest"), source)
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        got = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{source}: not a MixDQ quantized checkpoint ('format' is {quote(got)}).")
    version = data.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint format_version {quote(version)}; this MixDQ Studio reads format {FORMAT_VERSION}."
        )
    library = _need(data, "library_version", str, source)
    if library.split(".")[:2] != __version__.split(".")[:2]:
        raise CheckpointError(
            f"{source}: written by MixDQ Studio {quote(library)}; this is {__version__}, which reads "
            "checkpoints of its own minor version (the packed layouts may change between them); export it again."
        )
    if data.get("pack_chunk") != PACK_CHUNK:
        raise CheckpointError(f"{source}: packed with {quote(data.get('pack_chunk'))}-code chunks, not {PACK_CHUNK}.")
    dtype = _DTYPES.get(_need(data, "dtype", str, source))
    if dtype not in _FLOATS:
        raise CheckpointError(f"{source}: 'dtype' {quote(data.get('dtype'))} is not one of float16/bfloat16/float32.")
    try:
        config = PrecisionConfig.from_dict(data.get("config"))
    except ConfigError as err:
        raise CheckpointError(f"{source}: config: {err}") from None
    for key, kinds in (("options", dict), ("layers", dict), ("tensors", dict), ("fingerprint", str), ("model_id", str)):
        _need(data, key, kinds, source)
    options = data["options"]
    if options.get("backend") not in kernels.BACKENDS or not isinstance(options.get("fp8_fast_accum"), bool):
        raise CheckpointError(
            f"{source}: 'options' needs a 'backend' of {list(kernels.BACKENDS)} and a boolean 'fp8_fast_accum'."
        )
    for layer, entry in data["layers"].items():
        ok = (
            isinstance(entry, dict) and isinstance(entry.get("class"), str) and isinstance(entry.get("bos_aware"), bool)
        )
        if not ok or not isinstance(entry.get("path"), (str, type(None))):
            raise CheckpointError(f"{source}: layer {quote(layer)}: its entry needs a class, a path and bos_aware.")
    for key, spec in data["tensors"].items():
        ok = isinstance(spec, dict) and spec.get("dtype") in _DTYPES and isinstance(spec.get("sha256"), str)
        shape = spec.get("shape") if isinstance(spec, dict) else None
        ok = ok and isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
        if not ok or any(n < 0 for n in shape):
            raise CheckpointError(f"{source}: tensor {quote(key)}: its schema needs dtype, shape and sha256.")
    return _Manifest(data, config, dtype, source, f"{name}/{UNET_FOLDER}/{TENSOR_FILE}")


def _build_meta_unet(folder: Path, name: str):
    """The UNet of ``unet/config.json`` with every tensor on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    source = f"{name}/{UNET_FOLDER}/config.json"
    config = parse_json(read_text(folder / UNET_FOLDER / "config.json", source, "UNet config"), source)
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: a UNet config is a JSON object.")
    try:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as err:  # diffusers refuses it
        raise CheckpointError(f"{source}: not a UNet2DConditionModel config ({type(err).__name__}: {err}).") from None


class _TensorFile:
    """The safetensors file, read tensor by tensor, each checked against the manifest before use."""

    def __init__(self, path: Path, manifest: _Manifest) -> None:
        from safetensors import SafetensorError, safe_open

        self.source = manifest.tensor_source
        self.specs: dict[str, dict[str, Any]] = manifest.data["tensors"]
        if not path.is_file():
            raise CheckpointError(f"{self.source}: file not found.")
        self._check_header(path)
        try:
            self.handle = safe_open(str(path), framework="pt", device="cpu")
            keys = set(self.handle.keys())
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{self.source}: not a readable safetensors file ({err}).") from None
        for key in sorted(set(self.specs) - keys):
            raise CheckpointError(f"{self.source}: tensor {quote(key)} is missing (the manifest lists it).")
        for key in sorted(keys - set(self.specs)):
            raise CheckpointError(f"{self.source}: tensor {quote(key)} is not in the manifest.")
        self.used: set[str] = set()

    def _check_header(self, path: Path) -> None:
        """The file's own header against the manifest, entry by entry, before safetensors reads it: a truncated
        file or a changed byte in the header is reported with the tensor it hits."""
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{self.source}: not a safetensors file, or truncated (header of {length} bytes)."
                )
            raw = handle.read(length)
        try:
            header = parse_json(raw.decode("utf-8"), f"{self.source} header")
        except (UnicodeDecodeError, ConfigError) as err:
            raise CheckpointError(f"{self.source}: the header is corrupted ({err}).") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.source}: the header is corrupted (not a JSON object).")
        header.pop("__metadata__", None)
        data_bytes = size - 8 - length
        for key in sorted(set(self.specs) - set(header)):
            raise CheckpointError(f"{self.source}: tensor {quote(key)} is missing (the manifest lists it).")
        for key in sorted(set(header) - set(self.specs)):
            raise CheckpointError(f"{self.source}: tensor {quote(key)} is not in the manifest.")
        for key, entry in header.items():
            spec = self.specs[key]
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
            shape = entry.get("shape") if isinstance(entry, dict) else None
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if dtype is None or dtype != _DTYPES[spec["dtype"]]:
                got = entry.get("dtype") if isinstance(entry, dict) else entry
                raise self.error(key, f"the file's dtype {quote(got)} is not the manifest's {spec['dtype']}.")
            if shape != spec["shape"]:
                got = tuple(shape) if isinstance(shape, list) and len(shape) <= 8 else quote(shape)
                raise self.error(key, f"the file's shape {got} is not the manifest's {tuple(spec['shape'])}.")
            nbytes = math.prod(shape) * dtype.itemsize
            ints = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            if not (ints and 0 <= offsets[0] and offsets[1] - offsets[0] == nbytes):
                raise self.error(key, f"the file's data offsets {quote(offsets)} do not fit its shape and dtype.")
            if offsets[1] > data_bytes:
                raise self.error(key, f"its data ends at byte {offsets[1]} of {data_bytes}: the file is truncated.")

    def spec(self, key: str) -> dict[str, Any] | None:
        return self.specs.get(key)

    def error(self, key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: tensor {quote(key)}: {problem}")

    def check(self, key: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int | None, ...] | None = None) -> None:
        """The manifest's entry for ``key`` against what the model needs (before the data is read)."""
        spec = self.specs.get(key)
        if spec is None:
            raise CheckpointError(f"{self.source}: tensor {quote(key)} is missing (the model needs it).")
        if _DTYPES[spec["dtype"]] not in dtypes:
            allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            raise self.error(key, f"dtype {spec['dtype']}, expected {allowed}.")
        if shape is not None and (
            len(shape) != len(spec["shape"]) or any(s is not None and s != n for s, n in zip(shape, spec["shape"]))
        ):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise self.error(key, f"shape {tuple(spec['shape'])}, expected {want}.")

    def get(self, key: str) -> torch.Tensor:
        """The tensor, after checking the file's dtype, shape and bytes against the manifest."""
        spec = self.specs[key]
        from safetensors import SafetensorError

        try:
            tensor = self.handle.get_tensor(key)
        except (SafetensorError, RuntimeError, ValueError, OSError) as err:  # bad offsets or dtypes
            raise self.error(key, f"cannot be read ({type(err).__name__}: {err}).") from None
        if str(tensor.dtype).removeprefix("torch.") != spec["dtype"] or list(tensor.shape) != spec["shape"]:
            raise self.error(
                key,
                f"the file holds {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, the manifest "
                f"says {spec['dtype']} {tuple(spec['shape'])}.",
            )
        if _sha256(tensor)[:SHA_CHARS] != spec["sha256"]:
            raise self.error(key, "its bytes do not match the manifest's SHA-256 (the file is corrupted).")
        self.used.add(key)
        return tensor


def _axis_size(symbol: str, module: nn.Module) -> int:
    weight = module.weight
    if symbol == "out":
        return weight.shape[0]
    if symbol == "in":
        return math.prod(weight.shape[1:])
    return int(symbol)


def _layer_tensors(
    name: str, module: nn.Module, specs: tuple[TensorSpec, ...], present: Mapping[str, bool], file: _TensorFile
) -> dict[str, torch.Tensor | None]:
    """The layer's tensors by buffer name (``None`` for absent optional ones), all checked."""
    result: dict[str, torch.Tensor | None] = {}
    for spec in specs:
        key = f"{name}.{spec.name}"
        expected = present.get(spec.name, not spec.optional)
        if file.spec(key) is None:
            if expected:
                raise CheckpointError(f"{file.source}: tensor {quote(key)} is missing (the model needs it).")
            result[spec.name] = None
            continue
        if not expected and spec.name in present:
            raise file.error(key, "is not part of this layer as the config and architecture describe it.")
        ndim = len(file.spec(key)["shape"])
        shape: list[int | None] = [None] * ndim
        for axis, symbol in spec.axes:
            if -ndim <= axis < ndim:
                shape[axis] = _axis_size(symbol, module)
        file.check(key, spec.dtypes, tuple(shape) if spec.axes else None)
        if spec.axes and ndim < max(a if a >= 0 else -a - 1 for a, _ in spec.axes) + 1:
            raise file.error(key, f"has {ndim} dimensions, too few for this layer.")
        result[spec.name] = file.get(key)
    return result


def _act_kwargs(act_qparams_t: torch.Tensor | None, act_bits: int | None) -> dict[str, Any]:
    """What :meth:`PackedLayer._static_act_kwargs` made, from the ``(1 / s, zp, s)`` tensor it was made into."""
    if act_qparams_t is None or act_bits is None:
        return {}
    params = act_qparams_t.view(torch.float32)
    scale = tuple(float(s) for s in params[2])
    zero_point = tuple(int(z) for z in params[1])
    if len(scale) == 1:
        return {"act_scale": scale[0], "act_zp": zero_point[0], "act_bits": act_bits}
    return {"act_scale": scale, "act_zp": zero_point, "act_bits": act_bits}


def _deployed_layer(
    info: LayerInfo, meta: nn.Module, entry: dict[str, Any], manifest: _Manifest, file: _TensorFile
) -> nn.Module:
    """A deployed layer rebuilt from the file: the attributes its ``__init__`` sets, the buffers it registers."""
    config = manifest.config
    bits, act_bits = config.layer_weight_bits(info.name), config.layer_act_bits(info.name)
    cls = layer_class(layer_kind(meta), bits, config.layer_fp8(info.name))
    if entry.get("class") != cls.__name__:
        raise file.error(
            f"{info.name}.qweight", f"the manifest says {quote(entry.get('class'))}, the config {cls.__name__}."
        )
    has_bias = meta.bias is not None
    bos = entry.get("bos_aware") is True
    if bos and not (info.takes_text_embedding and cls is not DeployedConv2d):
        raise file.error(f"{info.name}.bos_inputs", "BOS K/V caches belong to cross-attention to_k / to_v only.")
    packed_act = issubclass(cls, PackedLayer) and cls is not DeployedFP8CodesLinear and act_bits is not None
    present = {"bias": has_bias, "act_qparams_t": packed_act, "bos_inputs": bos, "bos_outputs": bos}
    tensors = _layer_tensors(info.name, meta, LAYER_SCHEMAS[cls], present, file)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for buffer, value in tensors.items():
        module.register_buffer(buffer, value)
    module.layer_name = info.name
    module.weight_shape = tuple(meta.weight.shape)
    module.backend = manifest.data["options"]["backend"]
    module.out_features, module.in_features = info.out_features, info.in_features
    if issubclass(cls, PackedLayer):
        module.weight_bits, module.act_bits, module.k_split = bits, act_bits, info.concat_split
        module.act_kwargs = {} if cls is DeployedFP8CodesLinear else _act_kwargs(tensors["act_qparams_t"], act_bits)
    if cls in (DeployedFP8Linear, DeployedFP8CodesLinear):
        module.fast_accum = manifest.data["options"]["fp8_fast_accum"]
    path = entry.get("path")
    if cls is DeployedLinear:
        if path not in ("gemm", "dequant"):
            raise file.error(f"{info.name}.qweight", f"linear path {quote(path)} is not 'gemm' or 'dequant'.")
        module.linear_path = path
    if cls is DeployedConv2d:
        if path not in CONV_PATHS:
            raise file.error(f"{info.name}.qweight", f"conv path {quote(path)} is not one of {list(CONV_PATHS)}.")
        module.conv_path = path
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding"):
            setattr(module, attr, getattr(meta, attr))
    return module


def _quant_layer(
    info: LayerInfo, float_module: nn.Module, entry: dict[str, Any], manifest: _Manifest, file: _TensorFile
) -> QuantLayer:
    """An activation-only (W16A8) layer around its loaded float module, with its calibrated range and BOS cache."""
    if entry.get("class") != _QUANT_LAYER:
        raise file.error(f"{info.name}.weight", f"the manifest says {quote(entry.get('class'))}, the config W16A8.")
    act_bits = manifest.config.layer_act_bits(info.name)
    bos = entry.get("bos_aware") is True and info.takes_text_embedding
    parts = 1 if info.concat_split is None else 2
    for bits in ACT_BITS:
        key = f"{info.name}.act_range_{bits}"
        if file.spec(key) is not None or bits == act_bits:
            file.check(key, (torch.float32,), (parts, 2))
    tensors = _layer_tensors(info.name, float_module, _QUANT_LAYER_EXTRAS, {}, file)
    layer = QuantLayer(float_module, info.name, info.concat_split, bos)
    for bits in ACT_BITS:
        layer.set_act_range(bits, tensors[f"act_range_{bits}"])
    if (tensors["bos_inputs"] is None) != (tensors["bos_outputs"] is None):
        raise file.error(f"{info.name}.bos_outputs", "BOS inputs and outputs come together.")
    if tensors["bos_inputs"] is not None:
        if len(tensors["bos_inputs"]) != len(tensors["bos_outputs"]):
            raise file.error(f"{info.name}.bos_outputs", "one BOS output row per BOS input row.")
        layer._bos_inputs, layer._bos_outputs = tensors["bos_inputs"], tensors["bos_outputs"]
    layer.fp8 = manifest.config.layer_fp8(info.name)
    layer.weight_clip = manifest.config.weight_clip
    layer.set_bits(None, act_bits)
    layer.mode = QuantMode.QUANTIZED
    return layer


@torch.no_grad()
def load_quantized_unet(folder: str | Path, progress: bool = False):
    """The deployed UNet of a checkpoint folder, on the CPU in its saved dtype (see the module docstring).

    Everything is checked before the UNet is returned; the FP16 weights of its quantized layers never exist.
    """
    folder_path = Path(folder)
    name = str(folder)
    manifest = _read_manifest(folder_path, name)
    unet = _build_meta_unet(folder_path, name)
    layers = layer_inventory(unet)
    fingerprint = inventory_fingerprint(layers)
    if fingerprint != manifest.data["fingerprint"]:
        raise CheckpointError(
            f"{manifest.source}: made for another model (architecture {quote(manifest.data['fingerprint'])}); "
            f"{name}/{UNET_FOLDER}/config.json builds architecture {fingerprint}."
        )
    try:
        manifest.config.validate(layers, manifest.data.get("model_id", ""))
    except ConfigError as err:
        raise CheckpointError(f"{manifest.source}: config: {err}") from None
    file = _TensorFile(folder_path / UNET_FOLDER / TENSOR_FILE, manifest)
    table = manifest.data["layers"]
    config = manifest.config
    expected = {i.name for i in layers if config.layer_weight_bits(i.name) or config.layer_act_bits(i.name)}
    for layer_name in sorted(set(table) ^ expected):
        what = "is not a quantized layer of this config" if layer_name in table else "is missing from 'layers'"
        raise CheckpointError(f"{manifest.source}: layer {quote(layer_name)} {what}.")

    activation_only = []
    for info in tqdm(layers, desc="loading packed layers", disable=not progress):
        if info.name not in table:
            continue
        if config.layer_weight_bits(info.name) is None:
            activation_only.append(info)
            continue
        meta = unet.get_submodule(info.name)
        unet.set_submodule(info.name, _deployed_layer(info, meta, table[info.name], manifest, file))

    rest = {}
    for key, meta_tensor in unet.state_dict(keep_vars=True).items():
        if meta_tensor.is_meta:
            file.check(key, (meta_tensor.dtype,) if not meta_tensor.is_floating_point() else _FLOATS, meta_tensor.shape)
            rest[key] = file.get(key)
    unused = sorted(set(file.specs) - file.used - rest.keys())
    for info in activation_only:
        prefix = f"{info.name}."
        unused = [key for key in unused if not key.startswith(prefix)]
    if unused:
        raise file.error(unused[0], "is not part of this model.")
    unet.load_state_dict(rest, strict=False, assign=True)
    for info in activation_only:
        module = unet.get_submodule(info.name)
        unet.set_submodule(info.name, _quant_layer(info, module, table[info.name], manifest, file))
    leftover = sorted(set(file.specs) - file.used)
    if leftover:
        raise file.error(leftover[0], "is not part of this model.")
    meta_left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if meta_left:
        raise CheckpointError(f"{file.source}: tensor {quote(meta_left[0])} is missing (the model needs it).")
    unet.eval()
    unet.mixdq_config = config
    unet.mixdq_model_id = manifest.data.get("model_id", "")
    return unet


def is_checkpoint(folder: str | Path) -> bool:
    """True when ``folder`` holds a quantized checkpoint's manifest (what ``generate --config`` accepts)."""
    return (Path(folder) / UNET_FOLDER / MANIFEST_FILE).is_file()


def load_quantized(folder: str | Path, device: str | torch.device | None = None, progress: bool = False):
    """A diffusers ``StableDiffusionXLPipeline`` with the checkpoint's deployed UNet, on ``device``.

    The UNet is loaded and checked first, then the FP16 parts (text encoders, VAE) in the UNet's dtype; nothing
    live is touched, and a bad file raises :class:`CheckpointError` before the FP16 parts are read.
    ``pipe.model_id`` is the model the checkpoint was made from, ``pipe.unet.mixdq_config`` its config.
    """
    from diffusers import StableDiffusionXLPipeline

    from mixdq.models import default_device

    device = torch.device(device or default_device())
    unet = load_quantized_unet(folder, progress)
    dtype = next(p.dtype for p in unet.parameters() if p.is_floating_point())
    backends = {m.backend for m in unet.modules() if isinstance(m, DEPLOYED_TYPES)}
    if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16) and backends != {"torch"}:
        raise CheckpointError(
            f"{folder}: saved in {str(dtype).removeprefix('torch.')}, but the Triton kernels take float16/bfloat16 "
            "activations; export the checkpoint on the GPU (float16), or load it with device='cpu'."
        )
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(folder), unet=unet, dtype=dtype, local_files_only=True, add_watermarker=False
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{folder}: the pipeline parts cannot be loaded ({first}).") from None
    pipe.set_progress_bar_config(disable=not progress)
    pipe.model_id = unet.mixdq_model_id
    pipe.prompt_language = prompt_language(Path(folder))  # a str path too, as README shows
    return pipe.to(device)
