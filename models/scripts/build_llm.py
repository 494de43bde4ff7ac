"""Build the bundled tiny Llama: corpus, tokenizer, brief training, ONNX exports, packages.

Deterministic from the Python standard library's own docstrings (read with `ast`, never
imported). Writes models/bundled/tiny-llama-{hf,onnx-fp32,onnx-int8,genai-fp32,genai-int8}.

    nice -n 10 .venv/bin/python -m models.scripts.build_llm --steps 1000
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models" / "bundled"
NAME = "tiny-llama"
VERSION = "0.1.0"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 320,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}


def docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of one source file, in file order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                found.append(doc.strip())
    return found


def build_corpus() -> tuple[list[str], list[str]]:
    """(plain documents, chat documents) from the stdlib, sorted so the result is stable."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    chats: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in {"test", "idlelib", "site-packages", "lib2to3", "tkinter"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        found = docstrings(text)
        docs.extend(found)
        if found:
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            first = found[0].split("\n\n")[0].replace("\n", " ")[:300]
            chats.append(
                f"<|user|>\nWhat is the {module} module?<|end|>\n<|assistant|>\n{first}<|end|>\n"
            )
    license_file = stdlib / "LICENSE.txt"
    if license_file.is_file():
        docs.append(license_file.read_text(encoding="utf-8", errors="replace"))
    return docs, chats


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def write_hf_dir(out: Path, model: Any, tok: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)
    model.float()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": MODEL_CONFIG["max_position_embeddings"],
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
            indent=2,
        )
        + "\n"
    )


def train(token_ids: np.ndarray, steps: int, seq: int, batch: int, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    torch.set_num_threads(2)
    config = LlamaConfig(**{**MODEL_CONFIG, "attn_implementation": "eager"})
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters; corpus {len(token_ids)} tokens", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    data = torch.from_numpy(token_ids.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    warm = 50
    model.train()
    started = time.monotonic()
    for step in range(steps):
        lr = (
            3e-3
            * min(1.0, (step + 1) / warm)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(
                f"step {step} loss {loss.item():.3f} ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    model.eval()
    # Round every weight to a value fp16 represents exactly: the fp32 exports then equal the
    # fp16 safetensors kept for the transformers reference, at half the bundled size.
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model


class CacheWrapper:
    """Wraps LlamaForCausalLM into the optimum signature with flat past/present tensors."""

    @staticmethod
    def make(model: Any, layers: int) -> Any:
        import torch
        from transformers import DynamicCache

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *past):
                cache = DynamicCache(
                    ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)]
                )
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
                flat = []
                for i in range(layers):
                    layer = out.past_key_values.layers[i]
                    flat += [layer.keys, layer.values]
                return (out.logits, *flat)

        return Wrapped()


def export_optimum(model: Any, out: Path) -> None:
    import torch

    cfg = MODEL_CONFIG
    layers, kvh, hd = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    wrapped = CacheWrapper.make(model, layers)
    b, s, p = 2, 3, 4
    ids = torch.randint(4, 100, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).unsqueeze(0).repeat(b, 1)
    dtype = next(model.parameters()).dtype  # fp32, or fp16 for a half-precision export
    past = [torch.randn(b, kvh, p, hd, dtype=dtype) for _ in range(2 * layers)]
    past_names, present_names = [], []
    for i in range(layers):
        past_names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present_names += [f"present.{i}.key", f"present.{i}.value"]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for name in past_names:
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in present_names:
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            (ids, mask, pos, *past),
            str(out),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def build_genai(hf_dir: Path, out: Path, precision: str, quiet: bool = False) -> None:
    with tempfile.TemporaryDirectory() as cache:
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            cache,
        ]
        stderr = subprocess.DEVNULL if quiet else None  # its per-tensor progress lines
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=stderr)


def write_package(directory: Path, precision: str, layout: str, notes: str) -> None:
    from models.package import Hardware, Manifest, file_entry, write_manifest

    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != "model.json")
    manifest = Manifest.model_validate(
        {
            "schema": 1,
            "name": NAME,
            "version": VERSION,
            "task": "llm",
            "family": "llama",
            "runtime": "onnx",
            "precision": precision,
            "model": "model.onnx",
            "files": [file_entry(directory, n).model_dump() for n in names],
            "params": {
                "layout": layout,
                "tokenizer": "tokenizer.json",
                "tokenizer_config": "tokenizer_config.json",
                "context_length": MODEL_CONFIG["max_position_embeddings"],
                "weights": notes,
            },
            "hardware": Hardware(min_memory_mb=64).model_dump(),
            "description": f"Tiny Llama ({layout} ONNX layout, {precision}): RMSNorm, RoPE, "
            "SwiGLU, 4 query / 2 KV heads; trained briefly on Python stdlib docstrings",
        }
    )
    write_manifest(directory, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=BUNDLED)
    parser.add_argument("--skip-genai", action="store_true")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    docs, chats = build_corpus()
    texts = docs + chats * 2
    random.Random(args.seed).shuffle(texts)
    print(
        f"corpus: {len(docs)} docstrings, {len(chats)} chat turns, "
        f"{sum(map(len, texts)) / 1e6:.1f} MB",
        flush=True,
    )
    tok = train_tokenizer(texts, MODEL_CONFIG["vocab_size"])
    eos = MODEL_CONFIG["eos_token_id"]
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    model = train(np.asarray(ids, dtype=np.int32), args.steps, args.seq, args.batch, args.seed)
    notes = f"stdlib docstrings, {args.steps} steps x {args.batch} x {args.seq} tokens (AdamW)"
    hf = args.out / f"{NAME}-hf"
    shutil.rmtree(hf, ignore_errors=True)
    write_hf_dir(hf, model, tok)
    tokenizer_files = ["tokenizer.json", "tokenizer_config.json"]
    fp32 = args.out / f"{NAME}-onnx-fp32"
    int8 = args.out / f"{NAME}-onnx-int8"
    for d in (fp32, int8):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name in [*tokenizer_files, "config.json", "generation_config.json"]:
            shutil.copy(hf / name, d / name)
    export_optimum(model, fp32 / "model.onnx")
    quantize_int8(fp32 / "model.onnx", int8 / "model.onnx")
    write_package(fp32, "fp32", "optimum", notes)
    write_package(int8, "int8", "optimum", notes + "; ORT dynamic int8 per-channel")
    if not args.skip_genai:
        for precision in ("fp32", "int8"):
            d = args.out / f"{NAME}-genai-{precision}"
            shutil.rmtree(d, ignore_errors=True)
            build_genai(hf, d, precision)
            for extra in d.glob("*.data"):
                if extra.stat().st_size == 0:
                    extra.unlink()
            write_package(
                d, precision, "genai", notes + f"; onnxruntime-genai builder -p {precision}"
            )
    for d in sorted(args.out.glob(f"{NAME}-*")):
        size = sum(p.stat().st_size for p in d.iterdir())
        print(f"{d.name}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
