"""The two ONNX decoder layouts behind one batch interface: add a row (prefill), step every
row by one token, remove rows. The KV cache lives in a preallocated `KVArena`.

- optimum (`model.onnx` with `position_ids` and `past_key_values.N.key/value`): the graph
  concatenates past and new keys itself, so rows are right-aligned, padding is masked, and
  each step writes `present` straight into the arena's other half (IO binding, no copy here).
- onnxruntime-genai (`genai_config.json`, GroupQueryAttention): rows are left-aligned in a
  shared past/present buffer that the operator updates in place.
Joining and leaving rows re-lays the batch once; steps never copy the cache.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from models.llm.kv_cache import CacheShape, KVArena
from runtimes.errors import ModelFormatError, ModelNotFound
from runtimes.onnx import import_ort

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def detect_layout(directory: Path) -> str:
    """'genai' or 'optimum'; raise ModelNotFound/ModelFormatError with what was expected."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelNotFound(f"{directory}: no such model directory")
    if (directory / "genai_config.json").is_file():
        return "genai"
    if (directory / "model.onnx").is_file():
        return "optimum"
    raise ModelFormatError(
        f"{directory}: neither an onnxruntime-genai folder (genai_config.json) nor an optimum "
        "decoder folder (model.onnx with past_key_values inputs)"
    )


def make_session(path: Path, threads: int | None) -> Any:
    ort = import_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: the camera pipelines need those cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelFormatError(f"{path}: ONNX Runtime cannot load this decoder: {exc}") from exc


class DecoderBatch:
    """Common state: one session, the arena, and each row's cached length."""

    layout = ""

    def __init__(self, session: Any, shape: CacheShape, capacity_tokens: int, vocab: int):
        self.session = session
        self.shape = shape
        self.vocab = vocab
        self.arena = KVArena(shape, capacity_tokens)
        self.lengths: list[int] = []
        self._ort = import_ort()
        n = shape.layers
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        out = next(o for o in session.get_outputs() if o.name == "logits")
        if not self.vocab:
            raise ModelFormatError("the decoder's logits have no fixed vocabulary size")
        self._logits = np.empty((0, 1, vocab), dtype=ORT_TYPES.get(out.type, np.float32))
        self._logits_value: Any = None

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _ortvalue(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(array)

    def _run(self, binding: Any) -> np.ndarray:
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise ModelFormatError(f"decoder step failed: {exc}") from exc
        return np.asarray(binding.get_outputs()[0].numpy())

    def _bind_step_logits(self, io: Any, rows: int) -> np.ndarray:
        """Bind a preallocated [rows, 1, vocab] logits buffer (read without any wrapping)."""
        if self._logits.shape[0] != rows:
            self._logits = np.empty((rows, 1, self.vocab), dtype=self._logits.dtype)
            self._logits_value = self._ortvalue(self._logits)
        io.bind_ortvalue_output("logits", self._logits_value)
        return self._logits

    def _run_step(self, io: Any) -> np.ndarray:
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:
            raise ModelFormatError(f"decoder step failed: {exc}") from exc
        return self._logits[:, -1]

    def add(self, prompt: list[int], row_tokens: int) -> np.ndarray:
        """Prefill a new last row; return its next-token logits [vocab]."""
        raise NotImplementedError

    def step(self, tokens: list[int]) -> np.ndarray:
        """Feed one token per row; return logits [rows, vocab]."""
        raise NotImplementedError

    def remove(self, keep: list[int], row_tokens: int) -> None:
        """Keep only rows `keep` (ascending), in that order."""
        raise NotImplementedError


class OptimumBatch(DecoderBatch):
    """Right-aligned rows; the graph's Concat writes present into the arena's back half."""

    layout = "optimum"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.width = 0  # cache columns shared by every row
        self.mask = np.zeros((0, 0), dtype=np.int64)

    def add(self, prompt: list[int], row_tokens: int) -> np.ndarray:
        s = self.shape
        n = len(prompt)
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([prompt], dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
        }
        empty = np.zeros((1, s.kv_heads, 0, s.head_dim), dtype=s.dtype)
        for name in self.past_names:
            feeds[name] = empty
        try:
            out = self.session.run(None, feeds)
        except Exception as exc:
            raise ModelFormatError(f"decoder prefill failed: {exc}") from exc
        rows, old = self.rows, self.width
        width = max(old, n)
        arena = self.arena
        for t in range(2 * s.layers):
            back = arena.view(arena.back, t, rows + 1, width)
            if rows:
                back[:rows, :, width - old :] = arena.view(arena.front, t, rows, old)
            back[rows, :, width - n :] = out[1 + t][0]
        mask = np.zeros((rows + 1, width), dtype=np.int64)
        mask[:rows, width - old :] = self.mask
        mask[rows, width - n :] = 1
        arena.swap()
        self.mask, self.width = mask, width
        self.lengths.append(n)
        return np.asarray(out[0][0, -1])

    def step(self, tokens: list[int]) -> np.ndarray:
        rows, width, arena = self.rows, self.width, self.arena
        mask = np.ones((rows, width + 1), dtype=np.int64)
        mask[:, :width] = self.mask
        io = self.session.io_binding()
        self._bind_step_logits(io, rows)
        io.bind_cpu_input("input_ids", np.asarray(tokens, dtype=np.int64)[:, None])
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", np.asarray(self.lengths, dtype=np.int64)[:, None])
        for t, (past, present) in enumerate(zip(self.past_names, self.present_names)):
            io.bind_ortvalue_input(past, self._ortvalue(arena.view(arena.front, t, rows, width)))
            io.bind_ortvalue_output(
                present, self._ortvalue(arena.view(arena.back, t, rows, width + 1))
            )
        logits = self._run_step(io)
        arena.swap()
        self.mask, self.width = mask, width + 1
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def remove(self, keep: list[int], row_tokens: int) -> None:
        if keep == list(range(self.rows)):
            return
        lengths = [self.lengths[k] for k in keep]
        width = max(lengths, default=0)
        arena, old = self.arena, self.width
        for t in range(2 * self.shape.layers):
            front = arena.view(arena.front, t, self.rows, old)
            back = arena.view(arena.back, t, len(keep), width)
            for i, k in enumerate(keep):
                back[i] = front[k, :, old - width :]
        arena.swap()
        self.mask = self.mask[keep][:, old - width :] if keep else np.zeros((0, 0), np.int64)
        self.width, self.lengths = width, lengths


class GenaiBatch(DecoderBatch):
    """Left-aligned rows of `row_len` slots; GroupQueryAttention writes in place."""

    layout = "genai"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.row_len = 0
        self._step_io: Any = None  # cache bindings stay valid until the rows change

    def _bind_cache(self, io: Any, first: int, rows: int) -> None:
        arena, total = self.arena, first + rows
        for t, (past, present) in enumerate(zip(self.past_names, self.present_names)):
            buf = arena.view(arena.front, t, total, self.row_len)[first:total]
            value = self._ortvalue(buf)
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)

    def _relayout(self, keep: list[int], row_len: int) -> None:
        """Move rows `keep` into rows 0.. of a batch with `row_len` slots per row."""
        self._step_io = None
        arena, rows, old = self.arena, self.rows, self.row_len
        if row_len == old:  # same row stride: shift rows down inside the front half
            for t in range(2 * self.shape.layers):
                front = arena.view(arena.front, t, rows, old) if rows else None
                for i, k in enumerate(keep):
                    if i != k and front is not None:
                        front[i] = front[k]
            return
        span = min(old, row_len)
        for t in range(2 * self.shape.layers):
            front = arena.view(arena.front, t, rows, old) if rows else None
            back = arena.view(arena.back, t, len(keep), row_len)
            for i, k in enumerate(keep):
                if front is not None:
                    back[i, :, :span] = front[k, :, :span]
        arena.swap()
        self.row_len = row_len

    def add(self, prompt: list[int], row_tokens: int) -> np.ndarray:
        n = len(prompt)
        self._relayout(list(range(self.rows)), max(row_tokens, self.row_len, n))
        self.arena.view(self.arena.front, 0, self.rows + 1, self.row_len)  # capacity check
        io = self.session.io_binding()
        io.bind_output("logits")
        io.bind_cpu_input("input_ids", np.asarray([prompt], dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, n), dtype=np.int64))
        self._bind_cache(io, self.rows, 1)
        logits = self._run(io)
        self.lengths.append(n)
        self._step_io = None
        return logits[0, -1]

    def step(self, tokens: list[int]) -> np.ndarray:
        # The mask spans every slot of a row (GroupQueryAttention reads each row's length
        # from its sum), so its shape stays fixed while the rows do: the inputs are bound
        # once per batch and updated in place, one new column per row per step.
        io = self._step_io
        if io is None:
            io = self._step_io = self.session.io_binding()
            self._bind_step_logits(io, self.rows)
            self._bind_cache(io, 0, self.rows)
            self._ids = np.zeros((self.rows, 1), dtype=np.int64)
            lens = np.asarray(self.lengths, dtype=np.int64)
            self._mask = (np.arange(self.row_len)[None, :] < lens[:, None]).astype(np.int64)
            io.bind_ortvalue_input("input_ids", self._ortvalue(self._ids))
            io.bind_ortvalue_input("attention_mask", self._ortvalue(self._mask))
        # Scalar stores in a loop: for the 1-8 rows of a batch they beat numpy's fancy
        # indexing and in-place ufuncs (~0.3 against ~3 us a step for one row).
        ids, mask, lengths = self._ids, self._mask, self.lengths
        for i, (token, n) in enumerate(zip(tokens, lengths)):
            ids[i, 0] = token
            mask[i, n] = 1
        logits = self._run_step(io)
        self.lengths = [n + 1 for n in lengths]
        return logits

    def remove(self, keep: list[int], row_tokens: int) -> None:
        self._relayout(keep, row_tokens if keep else 0)
        self.lengths = [self.lengths[k] for k in keep]


def _optimum_shape(directory: Path, session: Any) -> tuple[CacheShape, int]:
    inputs = {i.name: i for i in session.get_inputs()}
    path = directory / "model.onnx"
    needed = {"input_ids", "attention_mask", "position_ids"}
    layers = sorted({int(m.group(1)) for name in inputs if (m := PAST.match(name))})
    if not needed <= set(inputs) or not layers:
        raise ModelFormatError(
            f"{path}: not an optimum decoder with cache: inputs {sorted(inputs)}; expected "
            "input_ids, attention_mask, position_ids and past_key_values.N.key/value"
        )
    past = inputs["past_key_values.0.key"]
    dtype = ORT_TYPES.get(past.type)
    kvh, hd = past.shape[1], past.shape[3]
    if not isinstance(kvh, int) or not isinstance(hd, int):
        config = _read_json(directory / "config.json")
        kvh = int(config.get("num_key_value_heads", config.get("num_attention_heads", 0)))
        hd = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if dtype is None:
        raise ModelFormatError(f"{path}: cache type {past.type} is not float32 or float16")
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else 0
    return CacheShape(len(layers), kvh, hd, np.dtype(dtype)), vocab


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFormatError(f"{path}: missing; needed to read the model's shape")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def open_decoder(
    directory: Path, cache_mb: float, block_size: int, threads: int | None = None
) -> DecoderBatch:
    """Load the decoder in `directory` (either layout) with `cache_mb` of KV cache (both
    arena halves together), a whole number of `block_size`-token blocks per half."""
    directory = Path(directory)
    layout = detect_layout(directory)
    if layout == "optimum":
        session = make_session(directory / "model.onnx", threads)
        shape, vocab = _optimum_shape(directory, session)
        return OptimumBatch(session, shape, capacity_for(shape, cache_mb, block_size), vocab)
    config = _read_json(directory / "genai_config.json")
    try:
        dec = config["model"]["decoder"]
        filename = dec["filename"]
        shape_args = (
            int(dec["num_hidden_layers"]),
            int(dec["num_key_value_heads"]),
            int(dec["head_size"]),
        )
        vocab = int(config["model"]["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{directory / 'genai_config.json'}: missing {exc}") from exc
    path = directory / filename
    if not path.is_file():
        raise ModelNotFound(f"{path}: named by genai_config.json but missing")
    session = make_session(path, threads)
    inputs = {i.name: i for i in session.get_inputs()}
    past = inputs.get("past_key_values.0.key")
    if past is None or "input_ids" not in inputs or "attention_mask" not in inputs:
        raise ModelFormatError(f"{path}: expected decoder inputs, got {sorted(inputs)}")
    dtype = ORT_TYPES.get(past.type)
    if dtype is None:
        raise ModelFormatError(f"{path}: cache type {past.type} is not float32 or float16")
    shape = CacheShape(*shape_args, np.dtype(dtype))
    capacity = capacity_for(shape, cache_mb, block_size)
    if "position_ids" in inputs:
        raise ModelFormatError(
            f"{path}: this genai decoder takes position_ids (MultiHeadAttention, as the builder "
            "makes for fp16 on the CPU); only GroupQueryAttention genai decoders are supported: "
            "build fp32, int8 or int4 for the CPU, or export the optimum layout"
        )
    return GenaiBatch(session, shape, capacity, vocab)


def capacity_for(shape: CacheShape, megabytes: float, block_size: int) -> int:
    """Tokens per arena half that `megabytes` of cache (both halves) hold, in whole blocks."""
    tokens = math.floor(megabytes * 2**20 / (2 * shape.bytes_per_token))
    return max(1, tokens // block_size) * block_size
