"""`python -m worker` is `papscan`."""

from worker.cli.main import app

app(prog_name="papscan")
