"""Sampling parameters (validated from a request) and the numpy sampler: greedy,
temperature, top-k, top-p, min-p, repetition penalty, per-request seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.llm import RequestRejected


class SamplingParams(BaseModel):
    """How one request picks its tokens and when it stops."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=64, ge=1, description="Most tokens to generate.")
    temperature: float = Field(default=0.0, ge=0, le=10, description="0: greedy.")
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens (0: all).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus mass to keep.")
    min_p: float = Field(default=0.0, ge=0, le=1, description="Drop p < min_p * max p.")
    repetition_penalty: float = Field(
        default=1.0, gt=0, le=10, description="Penalise tokens already seen (1: off)."
    )
    seed: int | None = Field(default=None, description="Random seed (None: fresh each time).")
    stop: list[str] = Field(default_factory=list, max_length=16, description="Stop strings.")
    stop_token_ids: list[int] = Field(
        default_factory=list, max_length=64, description="Extra stop token ids."
    )
    ignore_eos: bool = Field(default=False, description="Keep going past end-of-sequence.")

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> SamplingParams:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise RequestRejected("bad_request", problems) from exc

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks the next token of one request from its logits row."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a penalty: the argmax, which the engine takes for all rows at once."""
        return self.params.greedy and self.params.repetition_penalty == 1.0

    def __call__(self, logits: np.ndarray, seen: Sequence[int]) -> int:
        p = self.params
        if p.greedy and p.repetition_penalty == 1.0:
            return int(np.argmax(logits))
        row = logits.astype(np.float32, copy=True)
        if p.repetition_penalty != 1.0 and len(seen):
            ids = np.unique(np.asarray(seen, dtype=np.int64))
            vals = row[ids]
            row[ids] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(row))
        row /= p.temperature
        if 0 < p.top_k < row.shape[0]:
            cut = np.partition(row, -p.top_k)[-p.top_k]
            row[row < cut] = -np.inf
        row -= row.max()
        probs = np.exp(row)
        probs /= probs.sum()
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0.0
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = int(np.searchsorted(cum, p.top_p, side="left")) + 1
            probs[order[keep:]] = 0.0
        probs /= probs.sum()
        return int(self._rng.choice(probs.shape[0], p=probs))
