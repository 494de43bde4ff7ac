"""The `python -m models.synthdata` command line: `generate` a data set, render a `clip`.

Errors of ours are printed as one line with exit status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from runtimes.errors import EdgeAgentError

from .clip import count_frames, render_clip, render_stills
from .dataset import SynthDataError, generate
from .scene import SceneConfig
from .shapes import CLASS_NAMES


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32, got {text!r}")
    return w, h


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.synthdata",
        description="Synthetic shapes for training and demos; classes: " + ", ".join(CLASS_NAMES),
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a COCO data set of synthetic images")
    g.add_argument("--out", type=Path, default=Path("data/synth"), help="output folder")
    g.add_argument("--train", type=int, default=4000, help="training images")
    g.add_argument("--val", type=int, default=500, help="validation images")
    g.add_argument("--seed", type=int, default=0, help="base seed; same seed, same bytes")
    g.add_argument("--workers", type=int, default=2, help="worker processes (1: in-process)")
    g.add_argument(
        "--size",
        type=_size,
        default=None,
        help="fixed WIDTHxHEIGHT (default: a mix from 320x240 to 640x480)",
    )
    g.add_argument(
        "--min-size", type=float, default=SceneConfig.min_size, help="smallest object side in px"
    )
    g.add_argument(
        "--max-size-frac",
        type=float,
        default=SceneConfig.max_size_frac,
        help="largest object side as a fraction of the short image side",
    )
    g.add_argument(
        "--max-objects", type=int, default=SceneConfig.max_objects, help="most objects per image"
    )
    g.add_argument("--progress-every", type=int, default=250, help="images between lines")
    g.add_argument("--overwrite", action="store_true", help="replace images already there")

    c = sub.add_parser("clip", help="render the demo clip, its truth and sample stills")
    c.add_argument("--out", type=Path, default=Path("models/samples/demo.mp4"))
    c.add_argument("--seconds", type=float, default=15.0)
    c.add_argument("--fps", type=float, default=15.0)
    c.add_argument("--size", type=_size, default=(640, 480), help="WIDTHxHEIGHT")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument(
        "--stills", type=int, default=4, help="sample stills written beside the clip (0: none)"
    )
    return p


def _generate(args: argparse.Namespace) -> None:
    cfg = SceneConfig(
        min_size=args.min_size, max_size_frac=args.max_size_frac, max_objects=args.max_objects
    )
    if args.size is not None:
        cfg = replace(cfg, sizes=(args.size,))
    if args.workers < 1:
        raise SynthDataError(f"--workers must be >= 1, got {args.workers}")
    start = time.perf_counter()
    stats = generate(
        args.out,
        {"train": args.train, "val": args.val},
        args.seed,
        cfg,
        workers=args.workers,
        progress_every=max(1, args.progress_every),
        log=lambda line: print(line, flush=True),
        overwrite=args.overwrite,
    )
    total = sum(s["images"] for s in stats)
    elapsed = time.perf_counter() - start
    print(
        f"done: {total} images in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f} img/s) "
        f"-> {args.out}",
        flush=True,
    )


def _clip(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    info = render_clip(args.out, args.seconds, args.fps, args.size, args.seed)
    decoded = count_frames(args.out)
    if decoded != info["frames"]:
        raise SynthDataError(f"{args.out}: wrote {info['frames']} frames, read back {decoded}")
    print(
        f"clip: {info['path']} {info['frames']} frames ({decoded} read back), "
        f"{info['bytes'] / 1e6:.2f} MB, {info['tracks']} tracks, {info['boxes']} boxes, "
        f"truth {info['truth']} ({time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    if args.stills > 0:
        path = render_stills(args.out.parent, args.seed, args.stills)
        print(f"stills: {args.stills} images, annotations {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
        else:
            _clip(args)
    except EdgeAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
