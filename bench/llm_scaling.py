"""Batching against model size: single-stream tokens/s and 8 staggered requests on Llama
decoders of growing width in the onnxruntime-genai layout (GroupQueryAttention), with
onnxruntime-genai's own single stream on the same file.

    .venv/bin/python bench/llm_scaling.py [--hidden 128,512,1024] [--layers 4]
        [--precision int8,fp32,dq8]

Build-time extras needed (torch, transformers, onnxruntime-genai's builder). Each model is the
bundled tiny Llama's config with a wider hidden size (heads of 32, 2 query heads per KV head,
SwiGLU at 2.5x), random weights (the speed of a decode step does not depend on them), the
bundled tokenizer, built offline with `onnxruntime_genai.models.builder -p PRECISION -e cpu` into a
temporary directory. `dq8` is the builder's fp32 decoder with ONNX Runtime's dynamic int8
quantization (`quantize_dynamic`, per-channel MatMulInteger) instead of the builder's int8
(block-wise MatMulNBits). The KV cache is sized for all 8 requests, so the batch is measured,
not capped by admission control. The figures use the same functions as bench/llm_tokens.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_tokens import PROMPTS, alternating, engine_aggregate, engine_single, genai_single

from models.llm.engine import Engine
from models.scripts.build_llm import build_genai
from models.zoo import BUNDLED_DIR

HF = BUNDLED_DIR / "tiny-llama-hf"


def make_model(hidden: int, layers: int, precision: str, work: Path) -> tuple[Path, int]:
    """A random-weight Llama of this width in the genai layout; (its directory, params)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((HF / "config.json").read_text())
    heads = hidden // 32
    config.update(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=int(hidden * 2.5) // 8 * 8,
        num_hidden_layers=layers,
        dtype="float32",
    )
    hf_dir = work / f"hf-{hidden}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(str(hf_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (HF / name).is_file():
            shutil.copyfile(HF / name, hf_dir / name)
    out = work / f"genai-{hidden}-{precision}"
    if precision == "dq8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = work / f"genai-{hidden}-fp32-src"
        build_genai(hf_dir, fp32, "fp32", quiet=True)
        out.mkdir()
        for item in fp32.iterdir():
            if not item.name.startswith("model.onnx"):
                shutil.copyfile(item, out / item.name)
        quantize_dynamic(
            str(fp32 / "model.onnx"), str(out / "model.onnx"),
            weight_type=QuantType.QInt8, per_channel=True,
        )  # fmt: skip
        shutil.rmtree(fp32)
    else:
        build_genai(hf_dir, out, precision, quiet=True)
    shutil.rmtree(hf_dir)
    return out, sum(p.numel() for p in model.parameters())


def cache_mb_for(directory: Path, longest_prompt: int, tokens: int) -> float:
    """MB of KV cache (both arena halves) that 8 requests of the longest prompt need, x1.5."""
    dec = json.loads((directory / "genai_config.json").read_text())["model"]["decoder"]
    per_token = 2 * dec["num_hidden_layers"] * dec["num_key_value_heads"] * dec["head_size"] * 4
    return 1.5 * 2 * 8 * (longest_prompt + tokens + 16) * per_token / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="128,512,1024", help="comma-separated hidden sizes")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="alternating single-stream rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--precision", default="int8,fp32,dq8", help="comma-separated: int8, fp32, int4, dq8"
    )
    args = ap.parse_args(argv)
    print(
        f"genai layout, {args.layers} layers, {args.tokens} new tokens, {args.threads} "
        f"thread(s), 8 requests 0.5 ms apart; single streams: medians of {args.runs} "
        "alternating rounds of 3"
    )
    print(
        f"{'hidden':>6} {'params':>7} {'prec':>5} {'ours tok/s':>10} {'genai tok/s':>11} "
        f"{'ours/genai':>10} {'8 stag tok/s':>12} {'batch':>5} {'8 stag/single':>13}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="llm-scaling-") as tmp:
        for hidden in (int(h) for h in args.hidden.split(",")):
            for precision in args.precision.split(","):
                directory, params = make_model(hidden, args.layers, precision, Path(tmp))
                probe = Engine(directory)
                ids = probe.encode(PROMPTS[0], None)
                longest = max(len(probe.encode(p, None)) for p in PROMPTS)
                probe.close()
                singles = alternating(
                    {
                        "ours": functools.partial(
                            engine_single, directory, args.tokens, args.threads, 3
                        ),
                        "genai": functools.partial(
                            genai_single, directory, ids, args.tokens, args.threads, 3
                        ),
                    },
                    args.runs,
                )
                ours, theirs = singles["ours"], singles["genai"]
                assert ours is not None
                cache_mb = cache_mb_for(directory, longest, args.tokens)
                batch = engine_aggregate(directory, args.tokens, args.threads, 0.0005, cache_mb)
                vs = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:9.2f}x" if theirs else "-"
                print(
                    f"{hidden:6d} {params / 1e6:6.1f}M {precision:>5} "
                    f"{ours['tokens_per_s']:10.0f} "
                    f"{theirs['tokens_per_s'] if theirs else float('nan'):11.0f} {vs:>10} "
                    f"{batch['tokens_per_s']:12.0f} {batch['mean_batch']:5.2f} "
                    f"{batch['tokens_per_s'] / ours['tokens_per_s']:12.2f}x",
                    flush=True,
                )
                shutil.rmtree(directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
