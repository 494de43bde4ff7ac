"""The `edge-agent` command line: run (the daemon), detect, doctor, bench.

Errors of ours print one line and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from runtimes.errors import ConfigError, EdgeAgentError

# EX_CONFIG: the unit's RestartPreventExitStatus keeps systemd from retrying a bad config.
EXIT_CONFIG = 78

# Sub-commands that live beside the feature they drive. Each module has
# `register(sub)`, which adds its parsers and sets `run=callable(args) -> int` on them.
COMMAND_MODULES: tuple[str, ...] = ("provisioning.cli", "agent.cli_llm", "agent.cli_diffusion")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    detect = sub.add_parser(
        "detect", help="detect objects in images, videos and directories (JSON lines out)"
    )
    detect.add_argument(
        "model", help="model package dir, model.json, model file, or bundled name (yolox-nano)"
    )
    detect.add_argument("inputs", nargs="+", help="image files, video files or directories")
    detect.add_argument("--conf", type=float, default=0.25, help="score threshold (0.25)")
    detect.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold (0.45)")
    detect.add_argument("--runtime", choices=["tflite", "onnx"], help="override the runtime")
    detect.add_argument("--threads", type=int, help="inference threads")
    detect.add_argument("--save", type=Path, help="write annotated images/videos here")
    detect.add_argument("--max-frames", type=int, help="stop each video after N frames")

    run = sub.add_parser("run", help="run the agent daemon (what the systemd unit starts)")
    run.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/edge-agent/agent.toml"),
        help="agent.toml (default /etc/edge-agent/agent.toml)",
    )

    demo = sub.add_parser(
        "demo", help="the agent on the bundled model and clip with a local broker it starts"
    )
    demo.add_argument("--model", default="yolox-nano-tflite-int8", help="model to run")
    demo.add_argument("--seconds", type=float, default=20.0, help="how long to run (20)")
    demo.add_argument("--conf", type=float, default=0.25, help="score threshold (0.25)")

    doctor = sub.add_parser(
        "doctor", help="what this device offers: runtimes, providers, delegates"
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument(
        "--config", type=Path, help="agent.toml: also check the broker (TCP, TLS, MQTT)"
    )
    doctor.add_argument("--timeout", type=float, default=2.0, help="seconds per network step (2)")

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bdet = bench_sub.add_parser("detect", help="raw runtime call vs the full detect path")
    bdet.add_argument("models", nargs="*", help="models (default: every bundled one)")
    bdet.add_argument("--runs", type=int, default=100, help="timed runs per model (100)")
    bdet.add_argument("--warmup", type=int, default=10, help="untimed runs first (10)")
    bdet.add_argument("--threads", type=int, help="inference threads")
    bdet.add_argument("--image", type=Path, help="frame to use (default: demo clip frame)")
    bdet.add_argument("--json", action="store_true", help="machine-readable output")

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if getattr(args, "run", None) is not None:
            return int(args.run(args))
        if args.command == "detect":
            from agent.detect import run_detect

            if not 0.0 <= args.conf <= 1.0 or not 0.0 <= args.nms <= 1.0:
                print("error: --conf and --nms must be between 0 and 1", file=sys.stderr)
                return 2
            return run_detect(
                args.model,
                args.inputs,
                args.conf,
                args.nms,
                args.runtime,
                args.threads,
                args.save,
                args.max_frames,
            )
        if args.command == "run":
            from agent.daemon import run_agent

            return run_agent(args.config)
        if args.command == "demo":
            from agent.demo import run_demo

            return run_demo(args.model, args.seconds, args.conf)
        if args.command == "doctor":
            from agent.doctor import run_doctor

            return run_doctor(args.json, sys.stdout, config=args.config, timeout=args.timeout)
        if args.command == "bench" and args.bench_command == "detect":
            from agent.bench import run_bench_detect

            if args.runs < 1:
                print("error: --runs must be at least 1", file=sys.stderr)
                return 2
            return run_bench_detect(
                args.models,
                args.runs,
                args.warmup,
                args.threads,
                args.image,
                args.json,
                sys.stdout,
                sys.stderr,
            )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except EdgeAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
