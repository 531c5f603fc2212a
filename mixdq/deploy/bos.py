"""BOS-aware forward of deployed cross-attention ``to_k`` / ``to_v``: token 0's full-precision K/V from a cache.

See the package docstring (:mod:`mixdq.deploy`) for why the cache is built at deploy time.
"""

from __future__ import annotations

import torch

from mixdq.quant.layers import QuantLayer

# Relative L2 distance under which a run-time token-0 vector counts as a cached one. The same BOS state
# computed at another batch size or by another kernel differs by float rounding (< 1e-3 relative in FP16);
# BOS states of other text encoders or hidden layers (clip_skip) differ by O(1).
BOS_MATCH_RTOL = 1e-2


class BosCacheMissError(RuntimeError):
    """A deployed BOS-aware layer met a token-0 vector whose full-precision K/V it never precomputed."""


def _bos_vectors(layer: QuantLayer, extra_bos: torch.Tensor | None) -> torch.Tensor:
    """``(K, C_in)`` token-0 vectors to precompute: zeros, those the fake layer cached, and ``extra_bos``."""
    weight = layer.fp_module.weight
    rows = [torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)]
    for known in (layer._bos_inputs, extra_bos):
        if known is not None:
            rows.append(known.detach().to(weight.device, weight.dtype))
    return torch.cat(rows)


class BosAwareForward:
    """The forward of a deployed linear layer, BOS-aware for cross-attention ``to_k`` / ``to_v``.

    ``bos_inputs`` ``(K, C_in)`` / ``bos_outputs`` ``(K, C_out)`` (model dtype, BOS-aware layers only): the
    token-0 vectors this layer knows and their full-precision outputs, precomputed by :func:`deploy`; every
    other row goes through the subclass's ``_matmul``.
    """

    layer_name: str

    def _register_bos(self, layer: QuantLayer, extra_bos: torch.Tensor | None) -> None:
        if not layer.bos_aware:
            self.register_buffer("bos_inputs", None)
            self.register_buffer("bos_outputs", None)
            return
        keys = torch.unique(_bos_vectors(layer, extra_bos), dim=0)
        self.register_buffer("bos_inputs", keys)
        self.register_buffer("bos_outputs", layer.fp_module(keys).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bos_inputs is None:
            return self._matmul(x)
        return torch.cat([self._bos_rows(x[:, 0]).unsqueeze(1), self._matmul(x[:, 1:])], dim=1)

    def _bos_rows(self, token0: torch.Tensor) -> torch.Tensor:
        """Full-precision outputs ``(B, C_out)`` for token-0 inputs ``(B, C_in)``, from the precomputed cache."""
        # squared distances as plain elementwise ops + a reduction, which Inductor fuses into one small kernel
        # (cdist + norm are several launches per layer, a visible cost over an SDXL step's 140 BOS-aware layers;
        # bench/results/gpu_unet_h200_2026-11-28.md)
        keys = self.bos_inputs.float()
        distance2, index = (token0.float()[:, None, :] - keys[None]).square().sum(-1).min(dim=1)
        hit = distance2 <= BOS_MATCH_RTOL**2 * keys.square().sum(-1)[index]
        if token0.is_cuda or torch.compiler.is_compiling():
            # a device-side check: a host sync here would break CUDA-graph capture and torch.compile graphs
            # torch caps the message at 255 characters; compiled, it names no layer: Dynamo would guard on the
            # name, and every copy of a repeated block would compile on its own (run eagerly to see which layer)
            where = "a deployed BOS-aware layer" if torch.compiler.is_compiling() else self.layer_name
            torch._assert_async(hit.all(), f"BOS cache miss in {where}"[:250])
        elif not bool(hit.all()):
            raise BosCacheMissError(self._miss_message())
        return self.bos_outputs[index].to(token0.dtype)

    def _miss_message(self) -> str:
        return (
            f"{self.layer_name}: token 0 of the text embedding is none of the {len(self.bos_inputs)} vectors whose "
            "full-precision K/V were precomputed at deploy time (the text encoders' BOS state, the all-zeros "
            "negative embedding, and the vectors seen before deploy), and the FP weights needed to compute it "
            "were freed. Deploy with the pipeline whose text encoders make the embeddings (mixdq.deploy(pipe)), "
            "or run one generation with the same embedding settings (e.g. clip_skip, custom prompt_embeds) on "
            "the fake-quant model before deploying."
        )
