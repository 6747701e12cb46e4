"""The job queue as papscan's commands see it: reach Redis, send scan jobs, count them.

Jobs are Celery messages on two Redis lists, `stat` and `routine` (see
`worker.queue.app`); a job a worker has taken but not yet acknowledged waits in the
transport's `unacked` hash until its scan ends.
"""

from __future__ import annotations

import logging
import re

from worker.errors import BrokerUnavailableError, SettingsError
from worker.queue.app import QUEUES, SCAN_TASK, app

__all__ = ["check_broker", "queue_depths", "safe_broker_url", "send_scan"]

logger = logging.getLogger(__name__)

_UNACKED_KEY = "unacked"  # kombu's Redis transport default
_TIMEOUT_S = 5


def safe_broker_url(url: str) -> str:
    """The broker URL with its password replaced by `***`."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _client(url: str, timeout_s: float = _TIMEOUT_S):
    import redis

    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(
            f"PAPSCAN_BROKER_URL must be a redis:// URL, not {safe_broker_url(url)!r}."
        )
    return redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)


def check_broker(url: str) -> None:
    """Connect to Redis and PING it.

    Raises:
        BrokerUnavailableError: Redis cannot be reached (one sentence naming the URL).
        SettingsError: the URL is not a Redis URL.
    """
    import redis

    try:
        with _client(url) as client:
            client.ping()
    except redis.RedisError as exc:
        raise BrokerUnavailableError(
            f"cannot reach the job broker (Redis) at {safe_broker_url(url)}: {_reason(exc)}."
        ) from exc


def queue_depths(url: str, timeout_s: float = _TIMEOUT_S) -> dict[str, int]:
    """Jobs waiting per priority queue, and `in_flight`: taken by a worker, not yet done.

    Raises:
        BrokerUnavailableError: Redis cannot be reached.
    """
    import redis

    try:
        with _client(url, timeout_s) as client:
            depths = {name: int(client.llen(name)) for name in QUEUES}
            depths["in_flight"] = int(client.hlen(_UNACKED_KEY))
    except redis.RedisError as exc:
        raise BrokerUnavailableError(
            f"cannot reach the job broker (Redis) at {safe_broker_url(url)}: {_reason(exc)}."
        ) from exc
    return depths


def send_scan(scan_id: int, priority: str) -> None:
    """Send the `scan_slide` job of a scan to its priority's queue.

    Call only after the scan's row is committed: a worker may take the job at once.

    Raises:
        BrokerUnavailableError: Redis cannot be reached (after a few quick retries).
        ValueError: `priority` is not a queue.
    """
    from kombu.exceptions import OperationalError

    if priority not in QUEUES:
        raise ValueError(f"priority must be one of {', '.join(QUEUES)}, not {priority!r}")
    try:
        app.send_task(SCAN_TASK, args=[scan_id], queue=priority, routing_key=priority)
    except OperationalError as exc:
        raise BrokerUnavailableError(
            f"cannot reach the job broker (Redis) at {safe_broker_url(app.conf.broker_url)}:"
            f" {_reason(exc)}."
        ) from exc
    logger.info("scan %d sent to queue %s", scan_id, priority)


def _reason(exc: BaseException) -> str:
    """A driver's error as a short clause: "connection refused", not "Error 111 connecting…"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    text = re.sub(r"^Error -?\d+ connecting to \S+:\d+\.\s+", "", text).rstrip(". ")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text
