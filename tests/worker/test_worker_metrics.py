"""The worker's Prometheus metrics with real parts: a `papscan worker` subprocess serving
`/metrics` after a real scan, the autoscaling number on real PostgreSQL, the queue depth
from real Redis lists, `papscan serve --metrics-port` beside its token-guarded API, and
scrapes that survive a broker or database that cannot be reached.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from tests.worker.conftest import (
    Cluster,
    free_port,
    queued_scan,
    set_pg_connections,
    wait_for,
)
from tests.worker.test_distributed import corrupt_middle_tile
from train.synth import write_synthetic_slide
from worker import metrics
from worker.db.models import Scan, utc_now
from worker.db.session import Database

pytestmark = pytest.mark.slow

PIPELINE_STAGES = {"open", "plan", "read", "detect", "crop", "classify_cells", "write"}


def scrape(port: int) -> dict[str, float]:
    """`/metrics` of the process on `port`: sample (name and labels, as written) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15).read().decode()
    return parse(text)


def parse(text: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def names(samples: dict[str, float]) -> set[str]:
    return {key.split("{")[0] for key in samples}


def family_names(port: int) -> set[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15).read().decode()
    return {family.name for family in text_string_to_metric_families(text)}


def test_a_worker_serves_what_it_scanned(cluster: Cluster, tmp_path: Path) -> None:
    slide = tmp_path / "slide.tiff"
    write_synthetic_slide(slide, width=2048, height=2048, mpp=0.5, seed=3, cells=60)
    port = free_port()
    cluster.start_worker("metrics@test", "--metrics-port", str(port))
    before = scrape(port)
    assert before['papscan_slides_total{outcome="done"}'] == 0
    assert before['papscan_slides_total{outcome="failed"}'] == 0
    assert before["papscan_outstanding_scans"] == 0
    assert before['papscan_metrics_source_up{source="broker"}'] == 1
    assert before['papscan_metrics_source_up{source="database"}'] == 1

    scan_id = cluster.submit(str(slide))["queued"][0]["scan_id"]
    scan = cluster.wait_scans_end([scan_id])[scan_id]
    assert scan.status == "done", scan.error
    _, cells = cluster.row_counts(scan_id)
    assert cells > 0
    after = scrape(port)

    assert after['papscan_slides_total{outcome="done"}'] == 1
    assert after['papscan_slides_total{outcome="failed"}'] == 0
    assert after["papscan_cells_total"] == cells
    assert after["papscan_slide_seconds_count"] == 1
    wall_s = (scan.finished_at - scan.started_at).total_seconds()
    assert 0 < after["papscan_slide_seconds_sum"] <= wall_s + 1
    # Every stage the pipeline timed for this scan, and opening the file, has one sample.
    assert set(scan.stage_timings_ms) >= PIPELINE_STAGES
    for stage in set(scan.stage_timings_ms) - {"total"}:
        assert after[f'papscan_stage_seconds_count{{stage="{stage}"}}'] == 1, stage
        seconds = after[f'papscan_stage_seconds_sum{{stage="{stage}"}}']
        assert seconds == pytest.approx(scan.stage_timings_ms[stage] / 1000, abs=1e-3)
    assert 'papscan_stage_seconds_count{stage="total"}' not in after
    # Idle again: nothing running, no lease, nothing queued; the database saw it done.
    assert after["papscan_running_scans"] == 0
    assert after["papscan_lease_age_seconds"] == 0
    assert after["papscan_outstanding_scans"] == 0
    assert after['papscan_scans{status="done"}'] == 1
    assert after['papscan_scans{status="queued"}'] == 0
    assert after['papscan_queue_depth{priority="stat"}'] == 0
    assert after['papscan_queue_depth{priority="routine"}'] == 0
    # The engines' Triton-style counters sit beside them.
    detector = 'model="cell_detector",version="1"'
    assert after[f"nv_inference_request_success_total{{{detector}}}"] > 0
    assert after[f"nv_inference_count_total{{{detector}}}"] > 0
    assert after['nv_inference_exec_count_total{model="cell_classifier",version="1"}'] > 0
    # metric_names() lists every name served, families and samples, and every papscan
    # name it lists is served (but the GPU gauge: there is no GPU here).
    served = names(after) | family_names(port)
    assert served <= metrics.metric_names()
    papscan = {n for n in metrics.metric_names() if n.startswith("papscan_")}
    assert papscan - served == {"papscan_gpu_memory_used_bytes"}

    # A slide that fails while read counts as failed; its stages are not observed.
    broken = corrupt_middle_tile(slide, tmp_path / "broken.tiff")
    broken_id = cluster.submit(str(broken), "--force")["queued"][0]["scan_id"]
    assert cluster.wait_scans_end([broken_id])[broken_id].status == "failed"
    failed = scrape(port)
    assert failed['papscan_slides_total{outcome="failed"}'] == 1
    assert failed['papscan_slides_total{outcome="done"}'] == 1
    assert failed["papscan_slide_seconds_count"] == 2
    assert failed['papscan_stage_seconds_count{stage="plan"}'] == 1
    assert failed['papscan_scans{status="failed"}'] == 1
    assert failed["papscan_running_scans"] == 0


def _seed(db: Database, status: str, *, lease_expired: bool = False) -> int:
    _, scan_id = queued_scan(db)
    now = utc_now()
    values: dict = {"status": status}
    if status == "running":
        values |= {
            "worker": "gone@test",
            "attempt": 1,
            "started_at": now - timedelta(minutes=10),
            "lease_expires_at": now - timedelta(minutes=5) if lease_expired else now,
        }
    if status in ("done", "failed", "cancelled"):
        values["finished_at"] = now
    with db.transaction() as s:
        s.execute(update(Scan).where(Scan.id == scan_id).values(**values))
    return scan_id


def test_outstanding_scans_are_the_queued_and_running_ones(
    fresh_pg_url: str, redis_url: str
) -> None:
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    db = Database(fresh_pg_url)
    db.create_schema()
    try:
        for status, n in (("queued", 3), ("done", 4), ("failed", 2), ("cancelled", 1)):
            for _ in range(n):
                _seed(db, status)
        _seed(db, "running")
        _seed(db, "running", lease_expired=True)  # its worker died: still work to do
        with db.session() as s:
            assert metrics.outstanding_scans(s) == 5
            assert metrics.scans_by_status(s) == {
                "queued": 3,
                "running": 2,
                "done": 4,
                "failed": 2,
                "cancelled": 1,
            }
        # The text KEDA's postgresql scaler runs, through a plain driver connection.
        dsn = make_url(fresh_pg_url).set(drivername="postgresql")
        with psycopg.connect(dsn.render_as_string(hide_password=False)) as conn:
            assert conn.execute(metrics.OUTSTANDING_SCANS_SQL).fetchone() == (5,)

        client = redis.Redis.from_url(redis_url)
        client.lpush("stat", "a", "b")
        client.lpush("routine", "c", "d", "e")
        registry = CollectorRegistry()
        collector = metrics.QueueCollector(redis_url, fresh_pg_url)
        registry.register(collector)
        samples = parse(generate_latest(registry).decode())
        collector.close()
        assert samples["papscan_outstanding_scans"] == 5
        assert samples['papscan_scans{status="running"}'] == 2
        assert samples['papscan_scans{status="done"}'] == 4
        assert samples['papscan_queue_depth{priority="stat"}'] == 2
        assert samples['papscan_queue_depth{priority="routine"}'] == 3
        assert samples['papscan_metrics_source_up{source="broker"}'] == 1
        assert samples['papscan_metrics_source_up{source="database"}'] == 1
    finally:
        db.dispose()


def test_an_unreachable_broker_or_database_leaves_the_scrape_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    collector = metrics.QueueCollector(
        "redis://127.0.0.1:1/0", "postgresql+psycopg://nobody@127.0.0.1:1/none"
    )
    registry.register(collector)
    for _ in range(3):
        samples = parse(generate_latest(registry).decode())
    collector.close()
    assert samples == {
        'papscan_metrics_source_up{source="broker"}': 0,
        'papscan_metrics_source_up{source="database"}': 0,
    }
    warnings = [r for r in caplog.records if r.name == "worker.metrics"]
    assert len(warnings) == 2, "each source's error is logged once, not at every scrape"


def test_serve_exports_the_queue_on_its_own_port_beside_the_token_guarded_api(
    cluster: Cluster,
) -> None:
    for _ in range(2):
        queued_scan(cluster.db)
    api_port, metrics_port = free_port(), free_port()
    cluster.spawn(
        "serve",
        "--port",
        str(api_port),
        "--metrics-port",
        str(metrics_port),
        log=cluster.tmp / "serve.log",
    )

    def scraped() -> dict[str, float] | None:
        try:
            return scrape(metrics_port)
        except OSError:
            return None

    samples = wait_for(scraped, 60, "papscan serve's metrics")
    assert samples["papscan_outstanding_scans"] == 2
    assert samples['papscan_scans{status="queued"}'] == 2
    assert samples['papscan_queue_depth{priority="routine"}'] == 0
    assert "papscan_gpu_memory_used_bytes" not in names(samples)

    def api_up() -> int | None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/queue", timeout=5)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None
        return 200

    assert wait_for(api_up, 60, "papscan serve's API") == 401  # the API still wants a token
    # The metrics port serves metrics whatever the path, never the API.
    url = f"http://127.0.0.1:{metrics_port}/api/queue"
    assert urllib.request.urlopen(url, timeout=5).read().startswith(b"# HELP")

    # The database goes away: the scrape still answers, saying so.
    set_pg_connections(cluster.db_url, False)
    try:
        samples = scrape(metrics_port)
    finally:
        set_pg_connections(cluster.db_url, True)
    assert samples['papscan_metrics_source_up{source="database"}'] == 0
    assert samples['papscan_metrics_source_up{source="broker"}'] == 1
    assert "papscan_outstanding_scans" not in samples
