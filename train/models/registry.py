"""A name -> builder registry for papscan's models (timm's shape, without its machinery)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F) -> F:
    """Register a builder under its function name; a duplicate name is an error."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Raises:
        ValueError: The name is not registered.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**kwargs)


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    """Whether `name` is registered."""
    return name in _MODELS
