"""`edge-agent generate MODEL "prompt"`: run the on-device LLM locally and stream its text
to the terminal; usage (tokens, time to first token, tokens/s) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text with an LLM package, streamed")
    p.add_argument("model", help="LLM package directory or bundled name (tiny-llama-onnx-int8)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the model's chat template",
    )
    p.add_argument("--system", help="with --chat: a system message first")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens under min-p * max p")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads")
    p.add_argument("--json", action="store_true", help="print the final result as JSON")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from models.llm import RequestRejected
    from models.llm.engine import Engine, EngineOptions, resolve_model_dir
    from models.llm.sampler import SamplingParams

    try:
        params = SamplingParams.parse(
            {
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "top_k": args.top_k,
                "top_p": args.top_p,
                "min_p": args.min_p,
                "repetition_penalty": args.repetition_penalty,
                "seed": args.seed,
                "stop": args.stop,
            }
        )
    except RequestRejected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = Engine(resolve_model_dir(args.model), EngineOptions(threads=args.threads))
    try:
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            ids = engine.encode(None, [*messages, {"role": "user", "content": args.prompt}])
        else:
            ids = engine.encode(args.prompt, None)
        try:
            handle = engine.submit(ids, params)
        except RequestRejected as exc:
            print(f"error: {exc.code}: {exc}", file=sys.stderr)
            return 1
        final: dict[str, Any] = {}
        for event in handle.iter_events(timeout=600):
            if event["type"] == "chunk" and not args.json:
                sys.stdout.write(event["text"])
                sys.stdout.flush()
            else:
                final = event
    finally:
        engine.close()
    if final.get("type") == "error":
        print(f"\nerror: {final['code']}: {final['message']}", file=sys.stderr)
        return 1
    usage = final["usage"]
    if args.json:
        print(json.dumps({k: final[k] for k in ("text", "finish_reason", "usage")}))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(
            f"[{final['finish_reason']}] prompt {usage['prompt_tokens']} tokens, completion "
            f"{usage['completion_tokens']}, first token {usage['ttft_s'] * 1e3:.1f} ms, "
            f"{usage['tokens_per_s'] or 0:.1f} tokens/s",
            file=sys.stderr,
        )
    return 0
