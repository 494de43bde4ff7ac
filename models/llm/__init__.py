"""The LLM family: tokenizer and chat template, sampler, block-accounted KV cache, the two
ONNX decoder layouts, and the continuous-batching engine that serves them.

Errors (all under `runtimes.errors.EdgeAgentError`):

    GenerationError         a request cannot be served
    └── RequestRejected     refused before it ran: `code` says why (bad_request, too_long,
                            cache_full, queue_full, stopped)

Missing or wrong model files raise `ModelNotFound` / `ModelFormatError`.
"""

from __future__ import annotations

from runtimes.errors import EdgeAgentError


class GenerationError(EdgeAgentError):
    """A generation request cannot be served."""


class RequestRejected(GenerationError):
    """A request refused before it ran; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
