"""Batching against model size: single-stream tokens/s and 8 staggered requests on Llama
decoders of growing width in the onnxruntime-genai layout (GroupQueryAttention).

    .venv/bin/python bench/llm_scaling.py [--hidden 128,256,512] [--layers 4] [--precision int8]

Build-time extras needed (torch, transformers, onnxruntime-genai's builder). Each model is the
bundled tiny Llama's config with a wider hidden size (heads of 32, 2 query heads per KV head,
SwiGLU at 2.5x), random weights (the speed of a decode step does not depend on them), the
bundled tokenizer, built offline with `onnxruntime_genai.models.builder -p PRECISION -e cpu` into a
temporary directory. The figures use the same functions as bench/llm_tokens.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_tokens import engine_aggregate, engine_single

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
    build_genai(hf_dir, out, precision, quiet=True)
    return out, sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="128,256,512", help="comma-separated hidden sizes")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="int8", help="the builder's -p: int8, fp32, int4")
    args = ap.parse_args(argv)
    print(
        f"genai layout, {args.precision}, {args.layers} layers, {args.tokens} new tokens, "
        f"{args.threads} thread(s), 8 requests 0.5 ms apart"
    )
    print(
        f"{'hidden':>6} {'params':>8} {'single tok/s':>13} {'8 staggered tok/s':>18} {'ratio':>6}"
    )
    with tempfile.TemporaryDirectory(prefix="llm-scaling-") as tmp:
        for hidden in (int(h) for h in args.hidden.split(",")):
            directory, params = make_model(hidden, args.layers, args.precision, Path(tmp))
            single = engine_single(directory, args.tokens, args.threads, args.runs)
            batch = engine_aggregate(directory, args.tokens, args.threads, 0.0005)
            ratio = batch["tokens_per_s"] / single["tokens_per_s"]
            print(
                f"{hidden:6d} {params / 1e6:7.1f}M {single['tokens_per_s']:13.0f} "
                f"{batch['tokens_per_s']:18.0f} {ratio:5.2f}x",
                flush=True,
            )
            shutil.rmtree(directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
