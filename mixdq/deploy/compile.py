"""Regional compilation: ``torch.compile`` each repeated block of a UNet, not the whole UNet.

A whole-UNet compile traces every layer into one graph: minutes of warm-up for a deployed SDXL UNet (Dynamo
traces ~800 custom layers, Inductor generates and compiles one large graph;
``bench/results/gpu_unet_h200_2026-11-28.md``).
The UNet is mostly copies of a few blocks (``BasicTransformerBlock``, ``ResnetBlock2D``): compiled one by
one, blocks of the same structure and shapes share one compiled graph, so the warm-up is paid per distinct block
(the PyTorch "regional compilation" recipe; diffusers' ``compile_repeated_blocks`` does it for the transformer
blocks only). What stays eager between the blocks is small (embeddings, up/down samplers, in/out convs and
projections), and a CUDA graph around the step removes its launch cost.

For compiled code to be shared, the layers of one block type must not differ in Python values that the code
reads: deployed layers keep their per-layer numbers (activation scales, zero-points) in tensors under
torch.compile for that reason.
"""

from __future__ import annotations

from typing import Any

import torch

from mixdq.quant.api import unet_of

# diffusers' classes whose instances make up most of an SDXL-style UNet
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
# coarser regions: each Transformer2DModel whole (its norm, proj_in and proj_out compiled with its blocks, which
# otherwise run eagerly between them, a visible share of a step), plus the resnets and samplers; in
# an SDXL UNet its transformers come in two structures (640 x 2 blocks, 1280 x 10 blocks)
STAGES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def compile_repeated_blocks(model: Any, block_types: tuple[str, ...] = REPEATED_BLOCKS, **compile_kwargs: Any) -> int:
    """Compile every submodule of ``model``'s UNet (a pipeline or the UNet) whose class name is in
    ``block_types``, in place; returns how many. The first call at each shape compiles (lazily).

    A block inside another chosen block is compiled as part of it (``block_types=STAGES``: whole
    transformers). ``compile_kwargs`` go to ``torch.compile`` (e.g. ``fullgraph=True``, ``dynamic=False``). Raises
    ``ValueError`` when no block matches, so a renamed class cannot silently leave the UNet uncompiled.
    """
    unet = unet_of(model)
    blocks, chosen = [], []
    for name, module in list(unet.named_modules())[1:]:  # submodules: the UNet itself is not a region
        inside = any(name.startswith(f"{outer}.") for outer in chosen)  # compiled with the region around it
        if type(module).__name__ in block_types and not inside:
            blocks.append(module)
            chosen.append(name)
    if not blocks:
        raise ValueError(f"no {' / '.join(block_types)} in this model: nothing to compile regionally.")
    # one block type's forward is compiled once per distinct shape / layer layout (a mixed-precision config
    # can make every block distinct); past Dynamo's recompile limit (8) the rest would silently run eager
    limit = max(torch._dynamo.config.recompile_limit, len(blocks))
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
