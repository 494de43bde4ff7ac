"""The LLM engine on the bundled tiny Llama, run by ONNX Runtime in both layouts: batching
equals running alone, int8 agreement, admission control, cancel, deadlines, stop strings,
clear errors for bad models and requests, and the `edge-agent generate` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.llm import RequestRejected
from models.llm.decoder import OptimumBatch, open_decoder
from models.llm.engine import Engine, EngineOptions, Handle, generate
from models.llm.sampler import SamplingParams
from models.zoo import BUNDLED_DIR
from runtimes.errors import ModelFormatError, ModelNotFound

EDGE_AGENT = Path(sys.executable).parent / "edge-agent"
LAYOUTS = ["tiny-llama-onnx-fp32", "tiny-llama-genai-fp32"]
PROMPTS = [
    "Return the number of",
    "Open a file and return a stream. Raise OSError upon failure.",
    "The",
    "Create a new socket object and",
    "If the value is None, the default encoding is used; otherwise",
    "This class implements a queue of",
    "Raise ValueError if",
    "Convert a string to a list of words, splitting on whitespace and keeping",
]
GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module", params=LAYOUTS)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    eng = Engine(BUNDLED_DIR / request.param, EngineOptions(threads=1))
    yield eng
    assert eng.close()


def alone(eng: Engine, prompt: str, params: SamplingParams = GREEDY) -> list[int]:
    return generate(eng, eng.encode(prompt, None), params)["token_ids"]


def test_layout_is_detected(engine: Engine) -> None:
    info = engine.describe()
    assert info["layout"] == ("genai" if "genai" in str(engine.directory) else "optimum")
    assert info["context_length"] == 512 and info["kv_cache_bytes"] > 0


def test_batch_of_8_staggered_equals_each_alone(engine: Engine) -> None:
    expected = [
        alone(engine, p, GREEDY.model_copy(update={"max_tokens": 40 + 4 * i}))
        for i, p in enumerate(PROMPTS)
    ]
    before = engine.stats()["steps"]
    handles: list[Handle] = []
    for i, prompt in enumerate(PROMPTS):
        params = GREEDY.model_copy(update={"max_tokens": 40 + 4 * i})
        handles.append(engine.submit(engine.encode(prompt, None), params))
        # join at a different step each time: wait until the engine has stepped again
        target = engine.stats()["steps"] + 2
        deadline = time.monotonic() + 5
        while engine.stats()["steps"] < target and time.monotonic() < deadline:
            time.sleep(0.0005)
    got = [h.result(30)["token_ids"] for h in handles]
    assert got == expected
    stats = engine.stats()
    assert stats["steps"] > before and stats["peak_batch"] >= 4
    assert stats["running"] == 0 and stats["kv_blocks_used"] == 0


def test_stop_string_cuts_the_text(engine: Engine) -> None:
    full = generate(engine, engine.encode(PROMPTS[0], None), GREEDY)["text"]
    word = full.split()[1]
    final = generate(
        engine, engine.encode(PROMPTS[0], None), GREEDY.model_copy(update={"stop": [word]})
    )
    assert final["finish_reason"] == "stop"
    assert word not in final["text"] and full.startswith(final["text"])


def test_stream_chunks_add_up_and_usage_is_filled(engine: Engine) -> None:
    handle = engine.submit(engine.encode(PROMPTS[1], None), GREEDY)
    events = list(handle.iter_events(timeout=30))
    assert [e["seq"] for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] == "done" and final["finish_reason"] == "length"
    assert "".join(e["text"] for e in events[:-1]) == final["text"]
    usage = final["usage"]
    assert usage["completion_tokens"] == 32 and usage["prompt_tokens"] > 5
    assert usage["ttft_s"] > 0 and usage["tokens_per_s"] > 0


def test_sampling_with_seed_repeats(engine: Engine) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=3)
    first = alone(engine, PROMPTS[2], params)
    assert first == alone(engine, PROMPTS[2], params)
    assert first != alone(engine, PROMPTS[2], params.model_copy(update={"seed": 4}))


def test_cancel_and_deadline(engine: Engine) -> None:
    params = SamplingParams(max_tokens=450, ignore_eos=True)
    handle = engine.submit(engine.encode(PROMPTS[0], None), params)
    next(handle.iter_events(timeout=30))
    handle.cancel()
    final = handle.result(30)
    assert final["finish_reason"] == "cancelled" and final["usage"]["completion_tokens"] < 450
    late = engine.submit(engine.encode(PROMPTS[0], None), params, timeout_s=1e-4)
    final = late.result(30)
    assert final["finish_reason"] == "deadline" and final["usage"]["completion_tokens"] < 450


def test_requests_that_cannot_run_are_refused(engine: Engine) -> None:
    with pytest.raises(RequestRejected) as info:
        engine.submit(engine.encode("x " * 300, None), SamplingParams(max_tokens=300))
    assert info.value.code == "too_long" and "512" in str(info.value)
    with pytest.raises(RequestRejected) as info:
        engine.submit([], GREEDY)
    assert info.value.code == "bad_request"
    with pytest.raises(RequestRejected):
        engine.encode(None, None)


def test_admission_waits_for_blocks_and_rejects_what_never_fits() -> None:
    # 0.25 MiB = 64 tokens per arena half = 4 blocks of 16: one 48-token request at a time.
    eng = Engine(
        BUNDLED_DIR / "tiny-llama-genai-fp32",
        EngineOptions(cache_mb=0.25, block_size=16, max_wait_s=0.5, queue_depth=3),
    )
    try:
        assert eng.stats()["kv_blocks_total"] == 4
        ids = eng.encode(PROMPTS[0], None)
        with pytest.raises(RequestRejected) as info:
            eng.submit(ids, SamplingParams(max_tokens=64))
        assert info.value.code == "cache_full" and "4 in all" in str(info.value)
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        first, second = eng.submit(ids, params), eng.submit(ids, params)
        a, b = first.result(30), second.result(30)
        assert a["token_ids"] == b["token_ids"]
        assert eng.stats()["peak_batch"] == 1  # never both in the 4-block cache
        assert b["usage"]["queue_s"] > 0
        # requests held past max_wait_s (0.5 s) by a slow one (a 20 ms consumer per token
        # on the engine thread: over 1 s) fail with the reason
        hold = eng.submit(
            ids,
            SamplingParams(max_tokens=58, ignore_eos=True),
            on_event=lambda _event: time.sleep(0.02),
        )
        next(hold.iter_events(timeout=30))  # running: the queue holds only what follows
        blocked = [eng.submit(ids, SamplingParams(max_tokens=40)) for _ in range(3)]
        with pytest.raises(RequestRejected) as full:
            eng.submit(ids, SamplingParams(max_tokens=40))
        assert full.value.code == "queue_full"
        assert hold.result(30)["finish_reason"] == "length"
        finals = [h.result(30) for h in blocked]
        assert [f["type"] for f in finals] == ["error"] * 3
        assert all(f["code"] == "cache_full" and "waited" in f["message"] for f in finals)
        assert eng.stats()["kv_blocks_used"] == 0
    finally:
        eng.close()
    with pytest.raises(RequestRejected) as info:
        eng.submit(ids, params)
    assert info.value.code == "stopped"


def full_logits(batch: OptimumBatch, ids: list[int]) -> np.ndarray:
    s = batch.shape
    feeds = {
        "input_ids": np.asarray([ids]),
        "attention_mask": np.ones((1, len(ids)), np.int64),
        "position_ids": np.arange(len(ids))[None],
    }
    for name in batch.past_names:
        feeds[name] = np.zeros((1, s.kv_heads, 0, s.head_dim), s.dtype)
    return np.asarray(batch.session.run(["logits"], feeds)[0][0])


def test_int8_agreement_with_fp32_is_bounded() -> None:
    """Teacher-forced top-1 agreement of the int8 model along the fp32 greedy text."""
    fp32 = Engine(BUNDLED_DIR / "tiny-llama-onnx-fp32")
    try:
        runs = [(fp32.encode(p, None), alone(fp32, p)) for p in PROMPTS]
    finally:
        fp32.close()
    agree = []
    for name in ("tiny-llama-onnx-fp32", "tiny-llama-onnx-int8"):
        batch = open_decoder(BUNDLED_DIR / name, cache_mb=1, block_size=16)
        assert isinstance(batch, OptimumBatch)
        hits = []
        for prompt, out in runs:
            logits = full_logits(batch, prompt + out)
            hits += list(logits[len(prompt) - 1 : -1].argmax(-1) == np.asarray(out))
        agree.append(float(np.mean(hits)))
    assert agree[0] == 1.0  # the check itself: fp32 agrees with its own greedy run
    print(f"int8 top-1 agreement with fp32: {agree[1]:.3f}")
    assert agree[1] >= 0.9


def test_bad_model_directories_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such model directory"):
        open_decoder(tmp_path / "absent", 1, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="neither an onnxruntime-genai"):
        open_decoder(tmp_path / "empty", 1, 16)
    detector = tmp_path / "detector"
    detector.mkdir()
    shutil.copy(BUNDLED_DIR / "yolox-nano-onnx-fp32" / "model.onnx", detector / "model.onnx")
    with pytest.raises(ModelFormatError, match="not an optimum decoder"):
        open_decoder(detector, 1, 16)
    genai = tmp_path / "genai"
    genai.mkdir()
    (genai / "genai_config.json").write_text('{"model": {"decoder": {}}}')
    with pytest.raises(ModelFormatError, match="missing"):
        open_decoder(genai, 1, 16)
    broken = tmp_path / "broken"
    shutil.copytree(BUNDLED_DIR / "tiny-llama-onnx-int8", broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="tokenizers"):
        Engine(broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFound, match=r"tokenizer\.json"):
        Engine(broken)


def test_edge_agent_generate_streams_to_the_terminal() -> None:
    done = subprocess.run(
        [
            str(EDGE_AGENT),
            "generate",
            "tiny-llama-onnx-int8",
            PROMPTS[0],
            "--max-tokens",
            "12",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["usage"]["completion_tokens"] >= 1 and result["text"]
    chat = subprocess.run(
        [
            str(EDGE_AGENT),
            "generate",
            "tiny-llama-genai-int8",
            "What is the os module?",
            "--chat",
            "--max-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert chat.returncode == 0 and chat.stdout.strip() and "tokens/s" in chat.stderr
    bad = subprocess.run(
        [str(EDGE_AGENT), "generate", "no-such-llm", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "no such LLM" in bad.stderr


def test_engine_serves_threads_submitting_at_once(engine: Engine) -> None:
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        results[i] = alone(engine, PROMPTS[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [results[i] for i in range(4)] == [alone(engine, p) for p in PROMPTS[:4]]


def test_a_failing_step_fails_its_batch_and_the_engine_serves_on() -> None:
    eng = Engine(BUNDLED_DIR / "tiny-llama-onnx-int8")
    try:
        assert eng.batch is not None
        real_step = eng.batch.step
        calls = {"n": 0}

        def broken_once(tokens: list[int]) -> np.ndarray:
            calls["n"] += 1
            if calls["n"] == 3:
                raise ModelFormatError("decoder step failed: injected")
            return real_step(tokens)

        eng.batch.step = broken_once  # type: ignore[method-assign]
        ids = eng.encode(PROMPTS[0], None)
        failed = eng.submit(ids, GREEDY).result(30)
        assert failed["type"] == "error" and failed["code"] == "failed"
        assert "injected" in failed["message"]
        assert eng.stats()["kv_blocks_used"] == 0
        assert generate(eng, ids, GREEDY)["finish_reason"] == "length"
    finally:
        eng.close()
