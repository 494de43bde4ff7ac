"""The project's one exception hierarchy; every package raises from here.

    EdgeAgentError                  root: catch this at the CLI and daemon edges
    ├── BackendUnavailable          a runtime's native library is not installed
    ├── DelegateError               a delegate / execution provider cannot load
    ├── ModelError                  a model file or package is unusable
    │   ├── ModelNotFound           the path does not exist
    │   └── ModelFormatError        not a model, truncated, or wrong format
    ├── InputError                  a tensor fed to a model has the wrong shape/dtype
    ├── PackageError                model.json is missing, malformed or does not match its files
    └── ConfigError                 the agent's configuration is invalid

Third-party errors (ONNX Runtime, LiteRT, OpenCV) are caught where they enter and
re-raised as one of these, with the path and what was expected.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Root of every error this project raises on purpose."""


class BackendUnavailable(EdgeAgentError):
    """The native library behind a runtime backend is not installed."""


class DelegateError(EdgeAgentError):
    """A hardware delegate or execution provider could not be loaded."""


class ModelError(EdgeAgentError):
    """A model file cannot be used."""


class ModelNotFound(ModelError):
    """The model path does not exist."""


class ModelFormatError(ModelError):
    """The file is not a model of the expected format, or it is damaged."""


class InputError(EdgeAgentError):
    """An input tensor does not match what the model expects."""


class PackageError(EdgeAgentError):
    """A model package (model.json and its files) is invalid."""


class ConfigError(EdgeAgentError):
    """The agent configuration is invalid."""
