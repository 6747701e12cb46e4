"""Training and inference speed of every seed architecture, PyTorch eager against ONNX Runtime.

    python bench/train_speed.py [--archs se_sam_dnl_resnet50 cvm_cervix …] [--input-px 80]
                                [--batch 16] [--seconds 6] [--threads 2]

For each architecture, measured in one run on random inputs of the same shape:
- training images/s: forward, backward and an SGD step in PyTorch (train mode);
- inference cells/s: PyTorch eager (eval, no grad), ONNX Runtime FP32 on the model exported
  the way `papscan export` does (dynamic batch), and ONNX Runtime on its FP16 conversion
  (inputs and outputs kept FP32). ONNX Runtime's CPU provider has few FP16 kernels, so the
  FP16 figure on a CPU mostly measures the casts: FP16 pays off on a GPU.
The ratios printed are ORT FP32 / eager and ORT FP16 / ORT FP32. The global-local ROI
network counts cells (bags × cells per bag), with its CPU-sized settings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from train.export.onnx_export import export_onnx, onnx_session, write_fp16_onnx
from train.models import create_model

console = Console(width=150)  # the table must not wrap in a log file

CELL_ARCHS = (
    "resnet50",
    "se_sam_dnl_resnet50",
    "densenet121",
    "rcan_densenet121",
    "ran_resnet50",
    "cvm_cervix",
)
BAG_CELLS = 16
BAG_KWARGS = {"backbone": "resnet18", "embed_dim": 128, "attn_dim": 128, "num_heads": 4}


@dataclass(frozen=True)
class Case:
    """One architecture: how to build it, feed it and count what it processed."""

    name: str
    model: nn.Module
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...]
    cells_per_item: int


class Logits(nn.Module):
    """Export wrapper: the first output only (logits, or the ROI logits of a bag model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs)
        return out if isinstance(out, torch.Tensor) else out[0]


def make_case(name: str, input_px: int) -> Case:
    """Build `name` with 5 classes and a random-input factory at `input_px`."""
    if name == "global_local_roi":
        model = create_model(name, num_classes=4, **BAG_KWARGS)

        def bags(b: int) -> tuple[torch.Tensor, ...]:
            return torch.randn(b, BAG_CELLS, 3, input_px, input_px), torch.ones(
                b, BAG_CELLS, dtype=torch.bool
            )

        return Case(name, model, bags, ("cells", "mask"), BAG_CELLS)
    kwargs = {"img_size": input_px} if name == "cvm_cervix" else {}
    model = create_model(name, num_classes=5, **kwargs)
    return Case(name, model, lambda b: (torch.randn(b, 3, input_px, input_px),), ("images",), 1)


def rate(step: Callable[[], None], items: int, seconds: float) -> float:
    """Items per second of `step` over at least `seconds` (after one warm-up call)."""
    step()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 2:
        step()
        n += 1
    return n * items / elapsed


def train_rate(case: Case, batch: int, seconds: float) -> float:
    """Training items/s: forward, a cross-entropy loss, backward, an SGD step."""
    model = case.model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    inputs = case.inputs(batch)
    target = torch.zeros(batch, dtype=torch.long)

    def step() -> None:
        out = model(*inputs)
        logits = out if isinstance(out, torch.Tensor) else out[0]
        loss = nn.functional.cross_entropy(logits, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return rate(step, batch * case.cells_per_item, seconds)


def inference_rates(case: Case, batch: int, seconds: float, folder: Path) -> dict[str, float]:
    """Cells/s in eager PyTorch, ONNX Runtime FP32 and ONNX Runtime FP16."""
    wrapper = Logits(case.model.eval())
    inputs = case.inputs(batch)
    items = batch * case.cells_per_item
    with torch.inference_mode():
        eager = rate(lambda: wrapper(*inputs), items, seconds)
    fp32 = export_onnx(
        wrapper,
        inputs,
        folder / f"{case.name}.onnx",
        case.input_names,
        ("logits",),
        {n: {0: "batch"} for n in (*case.input_names, "logits")},
    )
    fp16 = write_fp16_onnx(fp32, folder / f"{case.name}.fp16.onnx")
    feeds = {
        n: t.numpy().astype(np.bool_ if t.dtype == torch.bool else np.float32)
        for n, t in zip(case.input_names, inputs, strict=True)
    }
    rates = {"eager": eager}
    for label, path in (("ort_fp32", fp32), ("ort_fp16", fp16)):
        session = onnx_session(path)
        rates[label] = rate(lambda s=session: s.run(None, feeds), items, seconds)
        rates[f"{label}_mb"] = path.stat().st_size / 1e6
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=[*CELL_ARCHS, "global_local_roi"])
    parser.add_argument("--input-px", type=int, default=80, help="cell crop side (paper 000: 80)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.batch < 2:
        parser.error("--batch must be at least 2 (batch norm needs two items to train)")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    table = Table(title=f"seed architectures at {args.input_px} px, batch {args.batch}")
    for column in (
        "arch",
        "params M",
        "train img/s",
        "eager cells/s",
        "ORT FP32",
        "ORT FP16",
        "FP32/eager",
        "FP16/FP32",
        "MB FP32→FP16",
    ):
        table.add_column(column, justify="right" if column != "arch" else "left")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            case = make_case(name, args.input_px)
            params = sum(p.numel() for p in case.model.parameters()) / 1e6
            console.print(f"[dim]{name}: training …[/]")
            train = train_rate(case, args.batch, args.seconds)
            console.print(f"[dim]{name}: inference …[/]")
            r = inference_rates(case, args.batch, args.seconds, Path(tmp))
            table.add_row(
                name,
                f"{params:.1f}",
                f"{train:.0f}",
                f"{r['eager']:.0f}",
                f"{r['ort_fp32']:.0f}",
                f"{r['ort_fp16']:.0f}",
                f"{r['ort_fp32'] / r['eager']:.2f}×",
                f"{r['ort_fp16'] / r['ort_fp32']:.2f}×",
                f"{r['ort_fp32_mb']:.0f}→{r['ort_fp16_mb']:.0f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
