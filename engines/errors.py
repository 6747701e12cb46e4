"""Errors of papscan: one root, subclasses named for what the caller does next.

The root lives here because `engines` is the package every other one may import
(`worker -> engines <- train`). Every message is one sentence a user can act on.
"""

from __future__ import annotations


class PapscanError(Exception):
    """Root of every error papscan raises on purpose; its message is one sentence."""


class ModelNotFoundError(PapscanError):
    """A model repository, model or version is missing: fix the path or the name."""


class ModelConfigError(PapscanError):
    """A model's config.yaml is invalid: the message names the file, the field, what is expected."""


class ModelLoadError(PapscanError):
    """An artifact exists but a backend could not load it."""


class ModelContractError(ModelLoadError):
    """Models of one repository that must work together do not fit: the message names the
    repository, the two models and what differs (see `engines.contract`)."""


class BackendUnavailableError(PapscanError):
    """The runtime a backend needs is not installed or has no device here."""


class ModelInputError(PapscanError, ValueError):
    """Arrays given to a model disagree with its config (names, dtypes or shapes): fix the call."""


class BatcherClosedError(PapscanError):
    """A dynamic batcher was closed: the request was not (or will not be) run."""


class BatcherTimeoutError(PapscanError, TimeoutError):
    """A dynamic batcher gave no result in time: the request was cancelled; the model is
    stuck or overloaded."""
