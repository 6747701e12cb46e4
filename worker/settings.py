"""papscan's settings: one frozen object read from `PAPSCAN_*` environment variables.

Every setting has a default that works on a laptop (SQLite in the user's data folder, the
model repository shipped in `engines/repository`, Redis on localhost). Reading the
settings touches nothing on disk: the SQLite folder is created by the database layer
when it is first used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_data_dir

from worker.errors import SettingsError

__all__ = ["Settings", "SettingsError", "default_db_url", "get_settings"]

_DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
_DEFAULT_READ_AHEAD = 4
_DEFAULT_DB_CHUNK_ROIS = 32
# A scan is stopped at its soft limit (its scan fails, the worker goes on) and its worker
# process is ended at the hard one; the broker must not hand a slide to a second worker
# while the first may still be on it, so the visibility timeout outlasts the hard limit.
_DEFAULT_SOFT_LIMIT_S = 2 * 3600
_DEFAULT_HARD_LIMIT_S = _DEFAULT_SOFT_LIMIT_S + 600
_VISIBILITY_MARGIN_S = 1800
# A running scan's lease is renewed every quarter of it: a worker that stopped renewing
# for a whole lease is dead or stuck, and live workers' reapers re-queue its slide.
_DEFAULT_LEASE_S = 120
_DEFAULT_REAPER_INTERVAL_S = 30
_DEFAULT_TASK_RETRIES = 5
_DEFAULT_RETRY_BACKOFF_S = 30


@dataclass(frozen=True, slots=True)
class Settings:
    """papscan's configuration.

    Attributes:
        db_url: SQLAlchemy URL of the results database (`PAPSCAN_DB_URL`); default a SQLite
            file `papscan.db` in the user's data folder.
        models_dir: model repository folder (`PAPSCAN_MODELS`); None means the repository
            shipped inside `engines`.
        broker_url: Celery broker URL (`PAPSCAN_BROKER_URL`).
        read_ahead: ROIs read and decoded ahead of inference (`PAPSCAN_READ_AHEAD`), >= 1.
        db_chunk_rois: ROIs written per database transaction (`PAPSCAN_DB_CHUNK_ROIS`), >= 1.
        scan_soft_limit_s: seconds after which a queued scan is stopped and failed
            (`PAPSCAN_SCAN_SOFT_LIMIT_S`); the worker goes on with the next slide.
        scan_hard_limit_s: seconds after which the worker process running a scan marks it
            failed and exits, for its supervisor to restart (`PAPSCAN_SCAN_HARD_LIMIT_S`);
            > the soft limit.
        visibility_timeout_s: seconds Redis waits for a delivered job's acknowledgement
            before handing it to another worker (`PAPSCAN_VISIBILITY_TIMEOUT_S`); default
            the hard limit plus 30 min. Shorter than the longest slide, a slide is scanned
            twice at once (the later attempt wins; the earlier stops at its next chunk).
            Leases make it the last resort: a dead worker's slide is re-queued by the
            reapers one lease after its last renewal.
        scan_lease_s: seconds a running scan's lease lasts without renewal
            (`PAPSCAN_SCAN_LEASE_S`), >= 4.
        reaper_interval_s: how often each worker looks for scans whose lease ran out
            (`PAPSCAN_REAPER_INTERVAL_S`), >= 1.
        task_max_retries: retries of a scan after transient errors (database unreachable)
            before it is failed (`PAPSCAN_TASK_MAX_RETRIES`).
        retry_backoff_s: first retry delay, doubled each retry up to 10 min
            (`PAPSCAN_RETRY_BACKOFF_S`), >= 1.
    """

    db_url: str
    models_dir: Path | None = None
    broker_url: str = _DEFAULT_BROKER_URL
    read_ahead: int = _DEFAULT_READ_AHEAD
    db_chunk_rois: int = _DEFAULT_DB_CHUNK_ROIS
    scan_soft_limit_s: int = _DEFAULT_SOFT_LIMIT_S
    scan_hard_limit_s: int = _DEFAULT_HARD_LIMIT_S
    visibility_timeout_s: int = _DEFAULT_HARD_LIMIT_S + _VISIBILITY_MARGIN_S
    task_max_retries: int = _DEFAULT_TASK_RETRIES
    retry_backoff_s: int = _DEFAULT_RETRY_BACKOFF_S
    scan_lease_s: int = _DEFAULT_LEASE_S
    reaper_interval_s: int = _DEFAULT_REAPER_INTERVAL_S


def default_db_url() -> str:
    """Return the URL of the default SQLite database (the file need not exist yet)."""
    path = Path(user_data_dir("papscan", appauthor=False)) / "papscan.db"
    return f"sqlite:///{path.as_posix()}"


def get_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from the environment.

    Not cached: reading is cheap, and tests and the CLI may change the environment.
    An empty variable counts as unset.

    Args:
        env: variables to read; default `os.environ`.

    Returns:
        The settings.

    Raises:
        SettingsError: a variable holds a value papscan cannot use.
    """
    env = os.environ if env is None else env

    def text(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    def integer(name: str, default: int, minimum: int) -> int:
        raw = text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer >= {minimum}, not {raw!r}.") from None
        if value < minimum:
            raise SettingsError(f"{name} must be an integer >= {minimum}, not {raw!r}.")
        return value

    models = text("PAPSCAN_MODELS")
    soft_s = integer("PAPSCAN_SCAN_SOFT_LIMIT_S", _DEFAULT_SOFT_LIMIT_S, 1)
    hard_s = integer("PAPSCAN_SCAN_HARD_LIMIT_S", max(_DEFAULT_HARD_LIMIT_S, soft_s + 60), 2)
    if hard_s <= soft_s:
        raise SettingsError(
            f"PAPSCAN_SCAN_HARD_LIMIT_S ({hard_s}) must be greater than"
            f" PAPSCAN_SCAN_SOFT_LIMIT_S ({soft_s})."
        )
    return Settings(
        db_url=text("PAPSCAN_DB_URL") or default_db_url(),
        models_dir=Path(models).expanduser() if models else None,
        broker_url=text("PAPSCAN_BROKER_URL") or _DEFAULT_BROKER_URL,
        read_ahead=integer("PAPSCAN_READ_AHEAD", _DEFAULT_READ_AHEAD, 1),
        db_chunk_rois=integer("PAPSCAN_DB_CHUNK_ROIS", _DEFAULT_DB_CHUNK_ROIS, 1),
        scan_soft_limit_s=soft_s,
        scan_hard_limit_s=hard_s,
        visibility_timeout_s=integer(
            "PAPSCAN_VISIBILITY_TIMEOUT_S", hard_s + _VISIBILITY_MARGIN_S, 1
        ),
        task_max_retries=integer("PAPSCAN_TASK_MAX_RETRIES", _DEFAULT_TASK_RETRIES, 0),
        retry_backoff_s=integer("PAPSCAN_RETRY_BACKOFF_S", _DEFAULT_RETRY_BACKOFF_S, 1),
        scan_lease_s=integer("PAPSCAN_SCAN_LEASE_S", _DEFAULT_LEASE_S, 4),
        reaper_interval_s=integer("PAPSCAN_REAPER_INTERVAL_S", _DEFAULT_REAPER_INTERVAL_S, 1),
    )
