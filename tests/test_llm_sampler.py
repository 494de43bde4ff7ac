"""Unit tests of the LLM's pure parts: sampling rules, stop strings while streaming, the
block budget and the cache arena's views."""

from __future__ import annotations

import numpy as np
import pytest

from models.llm import RequestRejected
from models.llm.kv_cache import BlockBudget, CacheShape, KVArena
from models.llm.sampler import Sampler, SamplingParams
from models.llm.tokenizer import StreamDecoder

LOGITS = np.log(np.array([0.05, 0.4, 0.3, 0.2, 0.05], dtype=np.float32))


def draws(params: SamplingParams, n: int = 400) -> set[int]:
    sampler = Sampler(params)
    return {sampler(LOGITS, []) for _ in range(n)}


def test_greedy_picks_the_argmax() -> None:
    assert draws(SamplingParams(), 5) == {1}


def test_temperature_samples_every_token_and_seed_repeats() -> None:
    assert draws(SamplingParams(temperature=1.0, seed=1)) == {0, 1, 2, 3, 4}
    a, b = (
        Sampler(SamplingParams(temperature=1.0, seed=7)),
        Sampler(SamplingParams(temperature=1.0, seed=7)),
    )
    assert [a(LOGITS, []) for _ in range(20)] == [b(LOGITS, []) for _ in range(20)]


def test_top_k_top_p_and_min_p_cut_the_tail() -> None:
    assert draws(SamplingParams(temperature=1.0, top_k=2, seed=0)) == {1, 2}
    # 0.4 + 0.3 = 0.7 reaches top_p 0.7: tokens 1 and 2 only
    assert draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0)) == {1, 2}
    # min_p 0.6: keep p >= 0.24 -> tokens 1 and 2
    assert draws(SamplingParams(temperature=1.0, min_p=0.6, seed=0)) == {1, 2}


def test_repetition_penalty_moves_greedy_off_a_seen_token() -> None:
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    logits = np.array([0.0, 3.0, 2.0], dtype=np.float32)
    assert sampler(logits, []) == 1
    assert sampler(logits, [1]) == 2  # 3.0 / 2 < 2.0
    negative = np.array([-1.0, -0.9, -5.0], dtype=np.float32)
    assert sampler(negative, [1]) == 0  # -0.9 * 2 < -1.0


@pytest.mark.parametrize(
    "raw",
    [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"colour": "red"}, {"stop": "x"}],
)
def test_bad_sampling_params_are_rejected(raw: dict) -> None:
    with pytest.raises(RequestRejected) as info:
        SamplingParams.parse(raw)
    assert info.value.code == "bad_request"


class CharTokenizer:
    """One token per character (id = code point), enough for StreamDecoder."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_stream_decoder_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    dec = StreamDecoder(CharTokenizer(), ["END"])  # type: ignore[arg-type]
    pieces = [dec.push(ord(c)) for c in "abEXcE"]
    assert "".join(pieces) == "abEXc"  # the last 'E' may start "END": held back
    assert not dec.stopped
    pieces = [dec.push(ord(c)) for c in "NDzz"]
    assert dec.stopped and dec.text == "abEXc" and "".join(pieces) == ""


def test_block_budget_counts_padded_rows() -> None:
    budget = BlockBudget(total_blocks=8, block_size=16)
    assert budget.fits_alone(128) and not budget.fits_alone(129)
    assert budget.reserve(1, 40)  # 1 row x 3 blocks
    assert budget.used_blocks == 3 and budget.row_tokens == 48
    assert budget.reserve(2, 10)  # 2 rows x 3 blocks (padded to the longest)
    assert budget.used_blocks == 6
    assert not budget.reserve(3, 10)  # 3 x 3 = 9 > 8
    budget.release(1)
    assert budget.used_blocks == 1 and budget.reserve(3, 10)


def test_arena_views_are_preallocated_and_bounded() -> None:
    arena = KVArena(CacheShape(layers=2, kv_heads=2, head_dim=4, dtype=np.dtype(np.float32)), 32)
    view = arena.view(arena.front, 0, 4, 8)
    view[:] = 1.0
    assert np.shares_memory(view, arena.view(arena.front, 0, 2, 16))
    with pytest.raises(MemoryError):
        arena.view(arena.front, 0, 5, 8)


def test_stream_decoder_fast_path_matches_the_window_path() -> None:
    from models.llm.tokenizer import TextTokenizer
    from models.zoo import BUNDLED_DIR

    tok = TextTokenizer(BUNDLED_DIR / "tiny-llama-genai-int8")
    text = "Return the list sorted by key, é ü 日本 and 🙂 END of it"
    ids = tok.encode(text)
    fast = StreamDecoder(tok, ["END"])
    assert fast._stream is not None  # tokenizers has DecodeStream here
    slow = StreamDecoder(tok, ["END"])
    slow._stream = None  # the two-decode window
    got = {"fast": [fast.push(i) for i in ids], "slow": [slow.push(i) for i in ids]}
    assert got["fast"] == got["slow"]
    assert "".join(got["fast"]) == fast.text == text[: text.index(" END")] + " "
    assert fast.stopped and slow.stopped
    assert not any("\ufffd" in piece for piece in got["fast"])
