"""Weight budgets: average bits <-> megabytes of the UNet's weights, exactly.

With byte-aligned rows, a quantized layer costs ``numel·bits/8`` bytes of codes plus a fixed
overhead (FP16 scales and bias), so the whole UNet's bytes are an affine function of the
size-weighted average bits (protected layers counted at 16). The intercept and slope come from
:func:`mixdq.memory.layer_weight_bytes`, so this agrees with :func:`mixdq.memory.weight_memory`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from mixdq.config import WEIGHT_BITS
from mixdq.inventory import LayerInfo
from mixdq.memory import FP16_BITS, FP16_BYTES, MB, layer_weight_bytes


class WeightBudgetScale:
    """Converts between the overall average weight bits and MB for one model and protected set."""

    def __init__(self, layers: Sequence[LayerInfo], other_params: int, protected: Collection[str]) -> None:
        self.numel = sum(info.weight_numel for info in layers)
        fixed_bits = other_params * FP16_BYTES * 8
        for info in layers:
            bits = (None,) if info.name in protected else WEIGHT_BITS
            overheads = {8 * layer_weight_bytes(info, b) - info.weight_numel * (b or FP16_BITS) for b in bits}
            if len(overheads) != 1:
                raise ValueError(
                    f"layer {info.name!r}: rows of {info.in_features} elements do not fill whole bytes at every "
                    f"bit-width in {list(WEIGHT_BITS)}, so a MB budget has no exact average-bits equivalent; "
                    "give the budget in bits instead."
                )
            fixed_bits += overheads.pop()
        self.fixed_bytes = fixed_bits / 8

    def mb(self, average_bits: float) -> float:
        """UNet weight MB (1 MB = 1e6 bytes, all parameters) at this overall average weight bits."""
        return (self.fixed_bytes + self.numel * average_bits / 8) / MB

    def bits(self, mb: float) -> float:
        """The overall average weight bits whose UNet weights take ``mb`` MB."""
        return (mb * MB - self.fixed_bytes) * 8 / self.numel
