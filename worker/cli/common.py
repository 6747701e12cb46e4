"""What every `papscan` command shares: one-sentence failures and the model repository."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from engines.errors import PapscanError


class Preparation(StrEnum):
    """How the slide was prepared: sets adequacy's minimum (TBS 2014)."""

    liquid_based = "liquid-based"
    conventional = "conventional"


PreparationOption = Annotated[
    Preparation | None,
    typer.Option(
        help="The slides' preparation, for adequacy: liquid-based needs 5,000 squamous cells,"
        " conventional 8,000 (not given: liquid-based, with a note)."
    ),
]

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="SQLAlchemy URL of the results database (default: PAPSCAN_DB_URL, else a "
        "SQLite file in the user data directory).",
    ),
]
ModelsOption = Annotated[
    Path | None,
    typer.Option(
        "--models", help="Model repository (default: PAPSCAN_MODELS, else the bundled one)."
    ),
]


def metrics_port_option(serves: str) -> Any:
    """`--metrics-port` (or PAPSCAN_METRICS_PORT): Prometheus metrics, without a token, at
    http://HOST:PORT/metrics, `serves` saying what; 0 serves none."""
    return Annotated[
        int,
        typer.Option(
            envvar="PAPSCAN_METRICS_PORT",
            min=0,
            max=65535,
            help=f"Serve Prometheus metrics ({serves}) at http://HOST:PORT/metrics, without a "
            "token, on this separate port; 0 serves none.",
        ),
    ]


def fails_in_one_sentence(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn papscan's errors into one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:
            # The reader went away (`papscan export … | head`): stop quietly, as cat does.
            # Point stdout at /dev/null so Python's exit-time flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except PapscanError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted; a scan that did not finish was marked failed and left no rows")
        except Exception as exc:  # a bug: still one line, the traceback goes to the log
            logging.getLogger("papscan").debug("unexpected error", exc_info=True)
            fail(
                f"internal error ({type(exc).__name__}: {exc}); rerun with --verbose "
                "for the traceback"
            )

    return wrapper


def fail(sentence: str) -> None:
    from worker.cli.console import err, labelled

    labelled(err, "papscan", "bold red", sentence)
    raise typer.Exit(1)


def repository(path: Path | None) -> Any:
    """The model repository at `path`, else `PAPSCAN_MODELS`, else the bundled one."""
    from engines.repository import ModelRepository, default_repository_path
    from worker.settings import get_settings

    return ModelRepository(path or get_settings().models_dir or default_repository_path())
