"""Initial schema: slides, scans, rois, cells, slide_results.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 05:25:47
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT ids on PostgreSQL; on SQLite only INTEGER PRIMARY KEY autoincrements.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON(none_as_null=True)
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "slides",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("vendor", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("mpp_x", sa.Float(), nullable=False),
        sa.Column("mpp_y", sa.Float(), nullable=False),
        sa.Column("barcode", sa.String(length=128), nullable=True),
        sa.Column("created_at", Timestamp, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_slides")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_slides_fingerprint")),
    )
    op.create_table(
        "scans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("model_versions", Json, nullable=False),
        sa.Column("stage_timings_ms", Json, nullable=True),
        sa.Column("rois_planned", sa.Integer(), nullable=True),
        sa.Column("rois_done", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("reader", sa.String(length=32), nullable=True),
        sa.Column("created_at", Timestamp, server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", Timestamp, nullable=True),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed', 'cancelled')",
            name=op.f("ck_scans_status"),
        ),
        sa.ForeignKeyConstraint(
            ["slide_id"], ["slides.id"], name=op.f("fk_scans_slide_id_slides"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scans")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_scans_slide_id_id"), "scans", ["slide_id", "id"])
    op.create_index(op.f("ix_scans_status"), "scans", ["status"])

    op.create_table(
        "rois",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("scan_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("x", sa.Integer(), nullable=False),
        sa.Column("y", sa.Integer(), nullable=False),
        sa.Column("w", sa.Integer(), nullable=False),
        sa.Column("h", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("probs", Json, nullable=False),
        sa.Column("cell_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["scan_id"], ["scans.id"], name=op.f("fk_rois_scan_id_scans"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rois")),
        sa.UniqueConstraint("scan_id", "index", name=op.f("uq_rois_scan_id_index")),
    )

    op.create_table(
        "slide_results",
        sa.Column("scan_id", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("cell_count", sa.Integer(), nullable=False),
        sa.Column("roi_count", sa.Integer(), nullable=False),
        sa.Column("class_counts", Json, nullable=False),
        sa.ForeignKeyConstraint(
            ["scan_id"],
            ["scans.id"],
            name=op.f("fk_slide_results_scan_id_scans"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("scan_id", name=op.f("pk_slide_results")),
    )
    op.create_index(op.f("ix_slide_results_score"), "slide_results", ["score"])

    op.create_table(
        "cells",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("scan_id", sa.Integer(), nullable=False),
        sa.Column("roi_id", BigId, nullable=False),
        sa.Column("x", sa.Integer(), nullable=False),
        sa.Column("y", sa.Integer(), nullable=False),
        sa.Column("w", sa.Integer(), nullable=False),
        sa.Column("h", sa.Integer(), nullable=False),
        sa.Column("detection_score", sa.Float(), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("suspicion", sa.Float(), nullable=False),
        sa.Column("probs", Json, nullable=False),
        sa.Column("attention", sa.Float(), nullable=False),
        sa.Column("review_rank", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["roi_id"], ["rois.id"], name=op.f("fk_cells_roi_id_rois"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["scan_id"], ["scans.id"], name=op.f("fk_cells_scan_id_scans"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cells")),
    )
    op.create_index(op.f("ix_cells_roi_id"), "cells", ["roi_id"])
    op.create_index(op.f("ix_cells_scan_id_label_x_y"), "cells", ["scan_id", "label", "x", "y"])
    op.create_index(
        op.f("ix_cells_scan_id_review_rank"),
        "cells",
        ["scan_id", "review_rank"],
        sqlite_where=sa.text("review_rank IS NOT NULL"),
        postgresql_where=sa.text("review_rank IS NOT NULL"),
    )
    op.create_index(op.f("ix_cells_scan_id_suspicion"), "cells", ["scan_id", "suspicion"])


def downgrade() -> None:
    op.drop_table("cells")
    op.drop_table("slide_results")
    op.drop_table("rois")
    op.drop_table("scans")
    op.drop_table("slides")
