"""`edge-agent diffuse MODEL "prompt" -o out.png`: run a diffusion pipeline locally.

Progress goes to stderr, a JSON summary (seed, timings, file) to stdout; errors exit 1 or 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from runtimes.errors import EdgeAgentError


def register(sub: Any) -> None:
    p = sub.add_parser("diffuse", help="generate an image with a diffusion pipeline")
    p.add_argument("model", help="pipeline directory (optimum SD layout) or bundled name (tiny-sd)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("-o", "--output", type=Path, required=True, help="image file (.png or .jpg)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, help="denoising steps (the package's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), help="image size")
    p.add_argument("--scheduler", help="ddim, euler, euler_a or lcm")
    p.add_argument("--condition", type=Path, help="condition image for the adapter")
    p.add_argument("--condition-type", help="canny, sobel or gray (the adapter's default)")
    p.add_argument("--adapter-weight", type=float, default=1.0, help="adapter weight (1.0)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads")
    p.set_defaults(run=run_diffuse)


def run_diffuse(args: argparse.Namespace) -> int:
    import cv2

    from models.diffusion.conditions import condition_map, decode_image
    from models.diffusion.pipeline import DiffusionPipeline, GenerateRequest, StepInfo
    from runtimes.base import RuntimeOptions

    if args.output.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        print("error: --output must end in .png, .jpg or .jpeg", file=sys.stderr)
        return 2
    pipe = DiffusionPipeline.open(args.model, RuntimeOptions(threads=args.threads))
    try:
        params = pipe.layout.params
        width, height = args.size or pipe.default_size
        condition = None
        if args.condition is not None:
            try:
                raw = args.condition.read_bytes()
            except OSError as exc:
                raise EdgeAgentError(f"{args.condition}: cannot read: {exc}") from exc
            adapter = params.get("adapter")
            default = adapter.get("condition", "canny") if isinstance(adapter, dict) else "canny"
            kind = args.condition_type or default
            condition = condition_map(kind, decode_image(raw), width, height)
        request = GenerateRequest(
            prompt=args.prompt,
            negative_prompt=args.negative,
            steps=args.steps or int(params.get("default_steps", 20)),
            seed=args.seed,
            guidance=args.guidance
            if args.guidance is not None
            else float(params.get("default_guidance", 7.5)),
            width=width,
            height=height,
            scheduler=args.scheduler or str(params.get("default_scheduler", "ddim")),
            condition=condition,
            adapter_weight=args.adapter_weight,
        )

        def progress(step: StepInfo) -> None:
            print(
                f"step {step.index + 1}/{step.steps}  {step.step_s * 1e3:.1f} ms",
                file=sys.stderr,
            )

        result = pipe.generate(request, progress)
    finally:
        pipe.close()
    bgr = cv2.cvtColor(result.image, cv2.COLOR_RGB2BGR)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.output), bgr):
        raise EdgeAgentError(f"{args.output}: could not write the image")
    steps = result.timings["step_s"]
    summary = {
        "output": str(args.output),
        "width": width,
        "height": height,
        "seed": request.seed,
        "steps": request.steps,
        "scheduler": request.scheduler,
        "ms_per_step": round(1e3 * sum(steps) / len(steps), 2),
        "total_s": round(result.timings["total_s"], 3),
    }
    print(json.dumps(summary))
    return 0
