"""engines imports nothing of worker/train/celery/sqlalchemy, and no runtime at import."""

from __future__ import annotations

import subprocess
import sys


def test_importing_engines_starts_nothing() -> None:
    code = (
        "import sys, engines.repository, engines.model, engines.config, engines.backends\n"
        "bad = ('worker', 'train', 'celery', 'sqlalchemy', 'onnxruntime', 'torch', 'tensorrt')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(bad)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
