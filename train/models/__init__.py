"""papscan's seed architectures: one file per family, all found through the registry.

Importing this package registers every family's builders (`create_model(name)`).
"""

from train.models import (  # noqa: F401  (importing a family registers its builders)
    cell_cnn,
    cvm_cervix,
    global_local,
    mil,
)
from train.models.registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "is_model", "list_models", "register_model"]
