"""Running scans hold a lease; scans record their models' sha256 and their warnings.

A worker renews `lease_expires_at` (and `heartbeat_at`) while it runs a scan; a delivery
of a scan with a live lease is dropped, and live workers re-queue scans whose lease ran
out. `model_sha256` (engine -> artifact sha256) tells two sets of weights apart where
the integer versions match; `warnings` keeps what the scan warned about (a coarse slide).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("model_sha256", sa.JSON(none_as_null=True)))
        batch.add_column(sa.Column("warnings", sa.JSON(none_as_null=True)))


def downgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        for column in ("warnings", "model_sha256", "heartbeat_at", "lease_expires_at"):
            batch.drop_column(column)
