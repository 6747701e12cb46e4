"""Errors a scan can end in; the CLI and the tasks turn each into one sentence and an exit code."""

from __future__ import annotations

from engines.errors import PapscanError


class SlideOpenError(PapscanError):
    """The file is not a slide papscan can scan (missing, not a slide, truncated, no mpp).

    Fail this slide's scan and do not retry: the file will not change by itself.
    """


class SlideReadError(PapscanError):
    """A region of an opened slide could not be read or decoded."""


class TransientError(PapscanError):
    """Something outside papscan failed for now (database, broker): safe to retry."""


class DatabaseUnavailableError(TransientError):
    """The results database cannot be reached or opened."""


class DatabaseConfigError(PapscanError):
    """The results database URL itself is wrong (syntax, unknown driver): fix it, do not retry."""


class ScanNotFoundError(PapscanError, LookupError):
    """No scan matches what the user asked for (a scan id, a slide path or fingerprint)."""


class SettingsError(PapscanError, ValueError):
    """A `PAPSCAN_*` environment variable holds a value papscan cannot use."""


class BrokerUnavailableError(TransientError):
    """The job broker (Redis at `PAPSCAN_BROKER_URL`) cannot be reached."""


class ScanTimeLimitError(PapscanError):
    """A queued scan ran past its soft time limit; it is failed, not retried."""


class ScanSupersededError(PapscanError):
    """The scan row no longer belongs to this attempt: it was cancelled, or a redelivery of
    its job claimed it again. The attempt stops writing and leaves the row alone.

    Attributes:
        scan_id: the scan.
        status: the row's status now (e.g. "cancelled", "running").
    """

    def __init__(self, scan_id: int, status: str) -> None:
        super().__init__(f"scan {scan_id} is no longer this worker's to write ({status}).")
        self.scan_id = scan_id
        self.status = status


class ScanStateError(PapscanError):
    """A scan is not in a state the command can act on (e.g. retrying a finished scan)."""
