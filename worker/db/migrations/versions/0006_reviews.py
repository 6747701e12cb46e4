"""Review decisions: a cytologist's call on a scan and on its cells, beside the AI's.

`slide_reviews` holds one row per decision on a scan (agrees with the AI category or
not, the reviewer's own category, a note); `cell_reviews` one row per verdict on a
cell (true or false positive). Rows are never updated: a later decision is a new row,
the newest is current. The AI's `slide_results` and `cells` are left as they are.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "slide_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scan_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("agrees", sa.Boolean(), nullable=False),
        sa.Column("category", sa.String(32), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["scan_id"],
            ["scans.id"],
            name=op.f("fk_slide_reviews_scan_id_scans"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_slide_reviews")),
    )
    op.create_index(op.f("ix_slide_reviews_scan_id"), "slide_reviews", ["scan_id"])
    op.create_table(
        "cell_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cell_id", BigId, nullable=False),
        sa.Column("scan_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "verdict IN ('true_positive', 'false_positive')",
            name=op.f("ck_cell_reviews_verdict"),
        ),
        sa.ForeignKeyConstraint(
            ["cell_id"],
            ["cells.id"],
            name=op.f("fk_cell_reviews_cell_id_cells"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["scan_id"],
            ["scans.id"],
            name=op.f("fk_cell_reviews_scan_id_scans"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cell_reviews")),
    )
    op.create_index(op.f("ix_cell_reviews_scan_id"), "cell_reviews", ["scan_id"])
    op.create_index(op.f("ix_cell_reviews_cell_id"), "cell_reviews", ["cell_id"])


def downgrade() -> None:
    op.drop_table("cell_reviews")
    op.drop_table("slide_reviews")
