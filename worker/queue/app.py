"""The Celery app: Redis as the broker, no result backend, settings for hour-long GPU jobs.

Importing this module connects to nothing and reads no settings: the configuration is
built from `PAPSCAN_*` variables (`worker.settings`) the first time Celery needs it.
Results live in the SQL database, so there is no result backend; the task is
`worker.queue.tasks.scan_slide`, sent by name so submitting never imports the pipeline.

Priorities: two queues, `stat` and `routine`, and every worker consumes both with the
Redis transport's `priority` queue order, so its BRPOP always names `stat` first and a
stat slide is the next slide any free worker takes. Why queues and not Redis priority
steps (one queue, `x-max-priority`): a queue per priority is a plain Redis list whose
length *is* that priority's backlog, which `papscan status` and an autoscaler (KEDA's
Redis list scaler) read with one LLEN; steps split one queue into hidden `queue\\x06\\x16N`
lists, and a worker started with `--queues stat` can still be set aside for urgent work.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from worker.settings import Settings, get_settings

__all__ = ["QUEUES", "SCAN_TASK", "app", "celery_config"]

QUEUES = ("stat", "routine")  # consumption order: stat first
SCAN_TASK = "papscan.scan_slide"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration for papscan's workers and submitters.

    Args:
        settings: papscan's settings (broker URL, time limits, visibility timeout).
    """
    visibility_s = settings.visibility_timeout_s
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": {
            # Redis has no acks: a delivered job waits in the `unacked` hash and goes back
            # to its queue when not acknowledged within the visibility timeout. It must
            # exceed the longest slide (the hard time limit), or Redis hands a slide still
            # being scanned to a second worker. (With a Redis result backend it would be
            # set in result_backend_transport_options too; papscan has none.)
            "visibility_timeout": visibility_s,
            # How often a worker sweeps for jobs past their timeout (a killed worker's
            # slide): every interval, never more than a tenth of the timeout.
            "unacked_restore_interval": max(1, min(60, visibility_s // 10)),
            "unacked_restore_throttle": 1,
            "queue_order_strategy": "priority",  # BRPOP stat routine, in that order
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 25,
        },
        # Results are written to SQL by the task; nothing is kept in Redis.
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # A job is acknowledged only when its scan has ended (done or failed), so a worker
        # that dies mid-slide leaves the job to be delivered again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One job at a time per worker: a slide takes minutes, a second reserved one
        # would wait on a busy GPU while another worker sits idle.
        "worker_prefetch_multiplier": 1,
        # Backstops for a scan that hangs. Celery enforces these only in its prefork
        # pool; papscan runs `solo` or `threads` (see worker/queue/tasks.py), so the task
        # enforces the same two limits itself.
        "task_soft_time_limit": settings.scan_soft_limit_s,
        "task_time_limit": settings.scan_hard_limit_s,
        "task_queues": [Queue(name, routing_key=name) for name in QUEUES],
        "task_default_queue": "routine",
        "task_create_missing_queues": False,
        # Publishing (submit, retry) gives up within seconds when Redis is away, so the
        # command can say so instead of hanging.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        # A running worker waits for Redis to come back, however long it is away.
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # On a lost connection the running slide finishes; its acknowledgement may be
        # lost with the connection, and the redelivered job then finds the scan done.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "enable_utc": True,
    }


app = Celery("papscan", set_as_current=False)


@app.on_configure.connect
def _configure(sender: Celery, **kwargs: Any) -> None:
    sender.config_from_object(celery_config(get_settings()))
