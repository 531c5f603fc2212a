"""MixDQ Studio: `python app.py [--model ID_OR_PATH] [--share] [--host H] [--port N] [--device cpu|cuda]`."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mixdq.cli import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description="MixDQ Studio: see what each bit costs before you ship it.")
    parser.add_argument(
        "--model",
        default=None,
        help="hub id (e.g. stabilityai/sdxl-turbo) or local folder; default: the embedded model",
    )
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for your network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="calibration / sensitivity cache")
    return parser.parse_args(argv)


def _first_sentence(err: OSError) -> str:
    """The first sentence of Gradio's launch error: it goes on about environment variables we have flags for."""
    return str(err).split(". ")[0].rstrip(".") or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import threading
    from pathlib import Path

    import torch

    from mixdq.deploy.checkpoint import is_checkpoint
    from mixdq.models import EMBEDDED_MODEL_ID, ModelNotAvailableError, default_device, load_pipeline
    from studio.sources import build_sources, model_folder, model_info_from_folder, prewarm_in_background
    from studio.ui import build_demo

    device = args.device or default_device()
    if "OMP_NUM_THREADS" not in os.environ:
        # One core stays free for the web server: the sliders answer while an image is generated, and torch's
        # OpenMP threads do not spin against each other on a busy machine (tens of times slower on 2 cores).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))

    if args.model is not None and is_checkpoint(args.model):
        return _serve_checkpoint(args, device, started)

    def load():
        return load_pipeline(args.model, device=device)

    # The page first: the sensitivity views need the model's config files only, so the pipeline (diffusers,
    # transformers, the weights) loads in the background once a page has its first views.
    folder = model_folder(args.model)
    try:
        if folder is None:  # no config files here yet (a hub id not downloaded): the pipeline first
            model = load()
        else:
            model = model_info_from_folder(folder, args.model or EMBEDDED_MODEL_ID, device, Path(args.cache_dir))
    except ModelNotAvailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    workspace, sources = build_sources(model, Path(args.cache_dir))
    first_view = threading.Event()
    demo = build_demo(workspace, sources, on_first_view=first_view.set)
    demo.queue(default_concurrency_limit=4, max_size=32)
    served = _launch(demo, args, started)
    if served != 0:
        return served
    if not workspace.loaded:
        workspace.load_in_background(load, after=first_view)
    prewarm_in_background(sources, after=first_view)
    return _block(demo)


def _serve_checkpoint(args: argparse.Namespace, device: str, started: float) -> int:
    """``--model CHECKPOINT_FOLDER``: load it with mixdq.load_quantized (a bad one: its one line, exit 2) and serve
    the checkpoint page (generate; no FP16 weights, so no compare or re-allocation)."""
    from mixdq.deploy.checkpoint import CheckpointError, load_quantized
    from studio.checkpoint_page import build_checkpoint_demo

    try:
        pipe = load_quantized(args.model, device=device)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo = build_checkpoint_demo(pipe, args.model)
    demo.queue(default_concurrency_limit=1, max_size=32)
    served = _launch(demo, args, started)
    return served if served != 0 else _block(demo)


def _launch(demo, args: argparse.Namespace, started: float) -> int:
    """Serve ``demo`` (0), or say in one line why it cannot be served (2)."""
    from studio.ui import head_html

    logging.getLogger("httpx").setLevel(logging.WARNING)
    gradio_says = io.StringIO()  # Gradio explains a failed share link in a dozen lines; we say it in one
    try:
        with contextlib.redirect_stdout(gradio_says):
            _, local_url, share_url = demo.launch(
                server_name=args.host,
                server_port=args.port,
                share=args.share,
                prevent_thread_lock=True,
                quiet=True,
                head=head_html(),
            )
    except OSError as err:  # Gradio: "Cannot find empty port in range ..." (busy port, or an address not ours)
        print(
            f"error: cannot serve on {args.host}:{args.port} ({_first_sentence(err)}); pass --port N",
            file=sys.stderr,
        )
        return 2
    print(f"MixDQ Studio ready at {local_url} ({time.perf_counter() - started:.1f} s)", flush=True)
    if args.share and not share_url:
        reason = gradio_says.getvalue().strip().splitlines()[0] if gradio_says.getvalue().strip() else "no answer"
        print(f"No public share link ({reason.rstrip('. ')}); serving locally only.", flush=True)
    elif share_url:
        print(f"Public link: {share_url}", flush=True)
    else:
        print(gradio_says.getvalue(), end="", flush=True)
    return 0


def _block(demo) -> int:
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
