"""Import ultralytics offline, with its settings file kept inside a run folder.

ultralytics reads its environment when first imported (online check, settings file,
auto-install), so `import_ultralytics` must run before any other ultralytics import.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType


def import_ultralytics(config_dir: Path, num_threads: int | None = None) -> ModuleType:
    """Set ultralytics to offline, no auto-install, no telemetry, then import it.

    ultralytics resets torch to `cpu_count - 1` threads when it selects the CPU (one
    thread on a 2-core machine, halving training speed); its thread count is set here to
    `num_threads` (default: torch's current count) instead.

    Args:
        config_dir: Folder for ultralytics' settings file (created).
        num_threads: Torch CPU threads ultralytics keeps.

    Returns:
        The `ultralytics` module.
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    os.environ["YOLO_VERBOSE"] = os.environ.get("YOLO_VERBOSE", "True")
    import torch
    import ultralytics
    import ultralytics.utils.torch_utils as ul_torch_utils
    from ultralytics import settings

    ul_torch_utils.NUM_THREADS = num_threads or torch.get_num_threads()

    settings.update(
        {
            "sync": False,
            "clearml": False,
            "comet": False,
            "dvc": False,
            "mlflow": False,
            "raytune": False,
            "tensorboard": False,
            "wandb": False,
            "vscode_msg": False,
            "openvino_msg": False,
        }
    )
    return ultralytics
