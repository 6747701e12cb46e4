"""API speed: a scan's cells in id order from an index; the worklist's QC flags apart.

`ix_cells_scan_id_id` on `cells (scan_id, id)`: the API pages a scan's cells in id
order (`GET /api/scans/{id}/cells`, the exports). Without it PostgreSQL walks the
primary key over every cell of every scan and filters on `scan_id` (over 1,000,000
cells, 63 ms for the first page of a 200,000-cell scan, 3 ms with it).

`slide_results.qc_flags`: the QC flags (`qc["flags"]`, a short list) in a column of
their own, filled from `qc` here and set with it by the ORM (`SlideResult.qc`). The
worklist shows them for every row, and reading them out of `qc` parsed the whole QC
JSON (a sharpness per ROI, kilobytes) for every slide: over half the time of a
10,000-slide worklist on PostgreSQL.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_cells_scan_id_id"), "cells", ["scan_id", "id"])
    with op.batch_alter_table("slide_results") as batch:
        batch.add_column(sa.Column("qc_flags", sa.JSON(none_as_null=True)))
    if op.get_bind().dialect.name == "postgresql":
        flags = "qc -> 'flags'"
    else:
        flags = "json_extract(qc, '$.flags')"
    op.execute(f"UPDATE slide_results SET qc_flags = {flags} WHERE qc IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("slide_results") as batch:
        batch.drop_column("qc_flags")
    op.drop_index(op.f("ix_cells_scan_id_id"), table_name="cells")
