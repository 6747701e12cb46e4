"""`papscan serve` (the REST API under uvicorn) and `papscan token create|list|revoke`.

papscan serve [--host 127.0.0.1] [--port 8000] [--db URL] [--metrics-port 9400]
papscan token create NAME     # prints the token once; only its sha256 is stored
papscan token list            # names and dates, never tokens
papscan token revoke NAME
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from worker.cli.common import DbOption, fail, fails_in_one_sentence, metrics_port_option

serve_app = typer.Typer(add_completion=False)
token_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Make, list and revoke API tokens."
)
serve_app.add_typer(token_app, name="token")


@contextmanager
def _database(url: str | None) -> Iterator[Any]:
    """The results database, its schema brought up to date, disposed after."""
    from worker.db.session import Database
    from worker.settings import get_settings

    database = Database(url or get_settings().db_url)
    try:
        database.create_schema()
        yield database
    finally:
        database.dispose()


@serve_app.command()
@fails_in_one_sentence
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    db: DbOption = None,
    metrics_port: metrics_port_option("queue depth, scans by status, the autoscaling number") = 0,
) -> None:
    """Serve the REST API and the review page (worklist, scans, cells, tiles, reviews);
    every API call needs a token."""
    import uvicorn

    from worker.api import create_app
    from worker.settings import get_settings

    with _database(db) as database:
        if metrics_port:
            from worker.metrics import serve as serve_metrics

            if metrics_port == port:
                fail(f"--metrics-port must differ from --port ({port})")
            try:
                url = database.url.render_as_string(hide_password=False)
                serve_metrics(metrics_port, get_settings().broker_url, url, gpu=False)
            except OSError as exc:
                fail(f"cannot serve metrics on port {metrics_port} ({exc.strerror or exc})")
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        typer.echo(
            f"papscan: review page at http://{shown}:{port}/ (sign in with a token from "
            "`papscan token create YOUR-NAME`)"
        )
        uvicorn.run(create_app(database), host=host, port=port, log_level="info")


@token_app.command("create")
@fails_in_one_sentence
def create(
    name: Annotated[str, typer.Argument(help="Who or what uses the token.")],
    db: DbOption = None,
) -> None:
    """Make a token and print it once (only its sha256 is stored)."""
    from worker.api.tokens import create_token

    with _database(db) as database:
        try:
            with database.transaction() as s:
                token = create_token(s, name)
        except ValueError as exc:
            fail(str(exc))
    typer.echo(token)
    typer.echo(f"token {name!r} made; it is shown only now.", err=True)


@token_app.command("list")
@fails_in_one_sentence
def list_(db: DbOption = None) -> None:
    """Token names with their creation and revocation dates (never the tokens)."""
    from worker.api.tokens import list_tokens
    from worker.db.worklist import aware

    with _database(db) as database, database.session() as s:
        tokens = list_tokens(s)
    if not tokens:
        typer.echo("no tokens (papscan token create NAME)", err=True)
    for t in tokens:
        revoked = aware(t.revoked_at)
        state = f"revoked {revoked:%Y-%m-%d %H:%M UTC}" if revoked else "active"
        typer.echo(f"{t.name}\tcreated {aware(t.created_at):%Y-%m-%d %H:%M UTC}\t{state}")


@token_app.command("revoke")
@fails_in_one_sentence
def revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    db: DbOption = None,
) -> None:
    """Revoke the token NAME: the API refuses it from now on."""
    from worker.api.tokens import revoke_token

    with _database(db) as database, database.transaction() as s:
        count = revoke_token(s, name)
    if count == 0:
        fail(f"no active token is named {name!r}")
    typer.echo(f"token {name!r} revoked", err=True)
