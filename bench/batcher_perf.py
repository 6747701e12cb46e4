"""The dynamic batcher against unbatched calls, in the manner of Triton's perf_analyzer.

    python bench/batcher_perf.py [--model cell_classifier] [--seconds 4]
                                 [--concurrency 1 2 4 8 16] [--sizes 1-4]

Closed loop: each of `concurrency` client threads sends a request of a random size drawn
from `--sizes` (cells of real shape, random values), waits for its answer, and sends the
next, for `--seconds`. Measured the same way twice in one run: through a
`DynamicBatcher` (the config's preferred sizes and queue delay) and straight into
`Model.infer` from every thread (unbatched). Printed per concurrency: requests/s,
cells/s, p50 and p95 latency, and the average batch the model executed (inferences /
executions, from the Triton metrics); then the ratios at the target concurrency. A second
table shows the model alone at fixed batch sizes, the ceiling batching can reach.

Target on the 2-core CI machine: at concurrency 8 with 1-4 cells per request, the batcher
gives >= 3x the unbatched throughput at <= 2x its p95 latency.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from engines.backends.base import example_feed
from engines.batcher import DynamicBatcher
from engines.metrics import InferenceMetrics
from engines.model import Model
from engines.repository import ModelRepository, default_repository_path

console = Console()


@dataclass
class Point:
    """One measured (mode, concurrency) point."""

    requests: int
    cells: int
    seconds: float
    latencies_ms: list[float]
    executions: float
    inferences: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds

    def latency(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    @property
    def avg_batch(self) -> float:
        return self.inferences / max(self.executions, 1)


def parse_sizes(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def request_pool(model: Model, sizes: tuple[int, int], count: int = 64) -> list[dict]:
    """Pre-built requests (so the clients measure inference, not array creation)."""
    rng = np.random.default_rng(0)
    one = example_feed(model.config, 1, "random")
    counts = rng.integers(sizes[0], sizes[1] + 1, size=count)
    return [{name: np.repeat(a, int(n), axis=0) for name, a in one.items()} for n in counts]


def run_clients(
    call: Callable[[dict], object], pool: list[dict], concurrency: int, seconds: float, model: Model
) -> Point:
    before = model.stats.snapshot()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    cells = [0] * concurrency
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(concurrency + 1)

    def client(i: int) -> None:
        k = i
        barrier.wait()
        while time.perf_counter() < stop:
            request = pool[k % len(pool)]
            k += concurrency
            t0 = time.perf_counter()
            call(request)
            latencies[i].append((time.perf_counter() - t0) * 1e3)
            cells[i] += len(next(iter(request.values())))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    after = model.stats.snapshot()
    flat = [x for per in latencies for x in per]
    return Point(
        requests=len(flat),
        cells=sum(cells),
        seconds=elapsed,
        latencies_ms=flat,
        executions=after["nv_inference_exec_count"] - before["nv_inference_exec_count"],
        inferences=after["nv_inference_count"] - before["nv_inference_count"],
    )


def batch_ceiling(model: Model, batch_sizes: list[int], seconds: float) -> Table:
    table = Table(title=f"{model.name} alone, one caller, fixed batch size")
    for column in ("batch", "ms/batch", "cells/s"):
        table.add_column(column, justify="right")
    for b in batch_sizes:
        feed = example_feed(model.config, b, "random")
        model.infer(feed)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(batch_sizes):
            model.infer(feed)
            n += 1
        elapsed = time.perf_counter() - start
        table.add_row(str(b), f"{elapsed / n * 1e3:.2f}", f"{n * b / elapsed:,.0f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cell_classifier")
    parser.add_argument("--repository", default=str(default_repository_path()))
    parser.add_argument("--seconds", type=float, default=4.0, help="per measured point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--sizes", default="1-4", help="cells per request, LOW-HIGH")
    parser.add_argument("--target-concurrency", type=int, default=8)
    args = parser.parse_args()

    repo = ModelRepository(args.repository, metrics=InferenceMetrics())
    model = repo.load(args.model, device="cpu")
    sizes = parse_sizes(args.sizes)
    pool = request_pool(model, sizes)
    console.print(
        f"{model.name}@{model.version} on {model.backend_name} "
        f"({model.describe().get('providers', '')}); requests of {sizes[0]}-{sizes[1]} cells"
    )
    results: dict[tuple[str, int], Point] = {}
    for concurrency in args.concurrency:
        results[("unbatched", concurrency)] = run_clients(
            model.infer, pool, concurrency, args.seconds, model
        )
        with DynamicBatcher(model) as batcher:
            results[("batcher", concurrency)] = run_clients(
                batcher.infer, pool, concurrency, args.seconds, model
            )
            settings = repr(batcher)

    table = Table(title=f"closed-loop clients, {settings}")
    for column in ("mode", "concurrency", "req/s", "cells/s", "p50 ms", "p95 ms", "avg batch"):
        table.add_column(column, justify="right")
    for (mode, concurrency), p in results.items():
        table.add_row(
            mode,
            str(concurrency),
            f"{p.rps:,.0f}",
            f"{p.cells_per_s:,.0f}",
            f"{p.latency(50):.2f}",
            f"{p.latency(95):.2f}",
            f"{p.avg_batch:.1f}",
        )
    console.print(table)
    largest = model.config.max_batch_size
    ceiling_sizes = sorted({b for b in (1, 4, 16, 64) if b < largest} | {largest})
    console.print(batch_ceiling(model, ceiling_sizes, 4.0))

    c = args.target_concurrency
    if ("batcher", c) in results:
        on, off = results[("batcher", c)], results[("unbatched", c)]
        speed = on.cells_per_s / off.cells_per_s
        p95 = on.latency(95) / off.latency(95)
        verdict = "met" if speed >= 3 and p95 <= 2 else "NOT met"
        console.print(
            f"concurrency {c}: batcher/unbatched throughput = {speed:.2f}x, "
            f"p95 latency ratio = {p95:.2f}x (target >= 3x at <= 2x: {verdict})"
        )
    model.close()


if __name__ == "__main__":
    main()
