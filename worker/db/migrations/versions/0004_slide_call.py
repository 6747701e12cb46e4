"""The slide call: Bethesda category, adequacy, slide QC, calibrated score, operating point.

`slide_results.category` now holds the Bethesda category (or "Unsatisfactory for
evaluation") and `score` the calibrated probability of an abnormal slide; the new
columns say how the call was made. `slides.preparation` is the preparation given at
submit or scan (NULL: not given, read as liquid-based).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RESULT_COLUMNS = (
    ("abnormal", sa.Boolean()),
    ("adequacy", sa.String(16)),
    ("squamous_estimate", sa.Integer()),
    ("adequacy_minimum", sa.Integer()),
    ("preparation", sa.String(32)),
    ("operating_point", sa.String(64)),
    ("notes", sa.JSON(none_as_null=True)),
    ("qc", sa.JSON(none_as_null=True)),
    ("evidence", sa.JSON(none_as_null=True)),
)


def upgrade() -> None:
    with op.batch_alter_table("slides") as batch:
        batch.add_column(sa.Column("preparation", sa.String(32)))
    with op.batch_alter_table("slide_results") as batch:
        for name, type_ in _RESULT_COLUMNS:
            batch.add_column(sa.Column(name, type_))


def downgrade() -> None:
    with op.batch_alter_table("slide_results") as batch:
        for name, _ in reversed(_RESULT_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("slides") as batch:
        batch.drop_column("preparation")
