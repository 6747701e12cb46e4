"""papscan's seed architectures: one file per family, all found through the registry.

Importing this package registers every family's builders (`create_model(name)`).
"""

from train.models import cell_cnn, mil  # noqa: F401  (registers the builders)
from train.models.registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "is_model", "list_models", "register_model"]
