"""`python -m worker` is `papscan`."""

from worker.cli import app

app(prog_name="papscan")
