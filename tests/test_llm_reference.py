"""The engine against transformers on the same fp32 tiny Llama: greedy tokens equal
`generate(do_sample=False)` in both ONNX layouts; tokenizer and chat template equal."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.llm.decoder import open_decoder
from models.llm.engine import Engine, EngineOptions, generate
from models.llm.sampler import SamplingParams
from models.zoo import BUNDLED_DIR

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.reference

HF_DIR = BUNDLED_DIR / "tiny-llama-hf"
PROMPTS = [
    "Return the number of",
    "Open a file and return a stream.",
    "class",
    "Create a new socket object using the given address family and",
]


@pytest.fixture(scope="module")
def reference() -> object:
    model = transformers.AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # run the full length, like ignore_eos
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer() -> object:
    return transformers.AutoTokenizer.from_pretrained(HF_DIR)


@pytest.fixture(scope="module", params=["tiny-llama-onnx-fp32", "tiny-llama-genai-fp32"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    eng = Engine(BUNDLED_DIR / request.param, EngineOptions(threads=1))
    yield eng
    eng.close()


def test_greedy_equals_transformers_generate(engine: Engine, reference: object) -> None:
    for prompt in PROMPTS:
        ids = engine.encode(prompt, None)
        x = torch.tensor([ids])
        with torch.no_grad():
            out = reference.generate(  # type: ignore[attr-defined]
                x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False
            )
        expected = out[0, len(ids) :].tolist()
        got = generate(engine, ids, SamplingParams(max_tokens=48, ignore_eos=True))
        assert got["token_ids"] == expected, prompt


def test_tokenizer_and_chat_template_equal_transformers(
    engine: Engine, hf_tokenizer: object
) -> None:
    for prompt in PROMPTS:
        assert engine.encode(prompt, None) == hf_tokenizer(prompt)["input_ids"]  # type: ignore[operator]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the json module?"},
    ]
    expected = hf_tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        messages, add_generation_prompt=True, tokenize=True
    )
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    assert engine.encode(None, messages) == list(expected)
    assert engine.tokenizer.bos_token == "<s>" and 2 in engine.tokenizer.eos_ids


def teacher_forced_top1(directory: Path, runs: list[tuple[list[int], list[int]]]) -> float:
    """Share of positions where the model's argmax is the fp32 greedy token."""
    batch = open_decoder(directory, cache_mb=1, block_size=16)
    s = batch.shape
    names = {i.name for i in batch.session.get_inputs()}
    hits: list[bool] = []
    for prompt, out in runs:
        ids = prompt + out
        feeds = {"input_ids": np.asarray([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(len(ids))[None]
        for name in batch.past_names:
            feeds[name] = np.zeros((1, s.kv_heads, 0, s.head_dim), s.dtype)
        logits = batch.session.run(["logits"], feeds)[0][0]
        hits += list(logits[len(prompt) - 1 : -1].argmax(-1) == np.asarray(out))
    return float(np.mean(hits))


def test_quantized_genai_models_agree_with_fp32(tmp_path: Path) -> None:
    """int8 (bundled) and int4 (built here by onnxruntime-genai's builder, offline)."""
    pytest.importorskip("onnxruntime_genai")
    int4 = tmp_path / "int4"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(HF_DIR),
            "-o",
            str(int4),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(tmp_path / "cache"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    fp32 = Engine(BUNDLED_DIR / "tiny-llama-genai-fp32")
    try:
        runs = [
            (ids, generate(fp32, ids, SamplingParams(max_tokens=32, ignore_eos=True))["token_ids"])
            for ids in (fp32.encode(p, None) for p in PROMPTS)
        ]
    finally:
        fp32.close()
    assert teacher_forced_top1(BUNDLED_DIR / "tiny-llama-genai-fp32", runs) == 1.0
    int8 = teacher_forced_top1(BUNDLED_DIR / "tiny-llama-genai-int8", runs)
    four = teacher_forced_top1(int4, runs)
    print(f"genai top-1 agreement with fp32: int8 {int8:.3f}, int4 {four:.3f}")
    assert int8 >= 0.9 and four >= 0.8
    eng = Engine(int4)  # and the engine serves it
    try:
        assert eng.describe()["layout"] == "genai"
        assert len(generate(eng, runs[0][0], SamplingParams(max_tokens=8))["token_ids"]) >= 1
    finally:
        eng.close()


def test_fp16_optimum_export_serves_and_agrees(tmp_path: Path) -> None:
    """The build script's exporter on the model cast to fp16: an fp16 KV cache, same text."""
    from models.scripts.build_llm import export_optimum

    half = transformers.AutoModelForCausalLM.from_pretrained(
        HF_DIR, dtype=torch.float16, attn_implementation="eager"
    ).eval()
    with warnings.catch_warnings():  # the TorchScript exporter's tracer and deprecation notes
        warnings.simplefilter("ignore")
        export_optimum(half, tmp_path / "model.onnx")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(HF_DIR / name, tmp_path / name)
    fp32 = Engine(BUNDLED_DIR / "tiny-llama-onnx-fp32")
    try:
        runs = [
            (ids, generate(fp32, ids, SamplingParams(max_tokens=32, ignore_eos=True))["token_ids"])
            for ids in (fp32.encode(p, None) for p in PROMPTS)
        ]
    finally:
        fp32.close()
    eng = Engine(tmp_path)
    try:
        assert eng.batch is not None and eng.batch.shape.dtype == np.float16
        served = generate(eng, runs[0][0], SamplingParams(max_tokens=8, ignore_eos=True))
        assert len(served["token_ids"]) == 8
    finally:
        eng.close()
    agree = teacher_forced_top1(tmp_path, runs)
    print(f"optimum fp16 top-1 agreement with fp32: {agree:.3f}")
    assert agree >= 0.95
