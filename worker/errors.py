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
