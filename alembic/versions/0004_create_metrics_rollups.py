"""create metrics rollups

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 04:35:34.579894
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollup_daily_platform",
        sa.Column("date_id", sa.Integer(), nullable=False),
        sa.Column("platform_id", sa.Integer(), nullable=False),
        sa.Column("impressions", sa.Numeric(precision=38, scale=0), nullable=False),
        sa.Column("clicks", sa.Numeric(precision=38, scale=0), nullable=False),
        sa.Column("cost", sa.Numeric(precision=38, scale=2), nullable=False),
        sa.Column("conversions", sa.Numeric(precision=38, scale=0), nullable=False),
        sa.Column("likes", sa.Numeric(precision=38, scale=0), nullable=False),
        sa.ForeignKeyConstraint(
            ["date_id"],
            ["dim_date.date_id"],
            name=op.f("fk_rollup_daily_platform_date_id_dim_date"),
        ),
        sa.ForeignKeyConstraint(
            ["platform_id"],
            ["dim_platform.platform_id"],
            name=op.f("fk_rollup_daily_platform_platform_id_dim_platform"),
        ),
        sa.PrimaryKeyConstraint("date_id", "platform_id", name=op.f("pk_rollup_daily_platform")),
    )
    op.create_table(
        "rollup_daily_region_device",
        sa.Column("date_id", sa.Integer(), nullable=False),
        sa.Column("region_id", sa.Integer(), nullable=False),
        sa.Column("device_type_id", sa.Integer(), nullable=False),
        sa.Column("impressions", sa.Numeric(precision=38, scale=0), nullable=False),
        sa.Column("clicks", sa.Numeric(precision=38, scale=0), nullable=False),
        sa.Column("cost", sa.Numeric(precision=38, scale=2), nullable=False),
        sa.Column("conversions", sa.Numeric(precision=38, scale=0), nullable=False),
        sa.Column("likes", sa.Numeric(precision=38, scale=0), nullable=False),
        sa.ForeignKeyConstraint(
            ["date_id"],
            ["dim_date.date_id"],
            name=op.f("fk_rollup_daily_region_device_date_id_dim_date"),
        ),
        sa.ForeignKeyConstraint(
            ["device_type_id"],
            ["dim_device_type.device_type_id"],
            name=op.f("fk_rollup_daily_region_device_device_type_id_dim_device_type"),
        ),
        sa.ForeignKeyConstraint(
            ["region_id"],
            ["dim_region.region_id"],
            name=op.f("fk_rollup_daily_region_device_region_id_dim_region"),
        ),
        sa.PrimaryKeyConstraint(
            "date_id", "region_id", "device_type_id", name=op.f("pk_rollup_daily_region_device")
        ),
    )
    # Facts loaded before this revision are summed into the new rollups.
    for table, keys in (
        ("rollup_daily_platform", "date_id, platform_id"),
        ("rollup_daily_region_device", "date_id, region_id, device_type_id"),
    ):
        op.execute(
            f"INSERT INTO {table} SELECT {keys}, sum(impressions), sum(clicks), sum(cost),"  # noqa: S608
            f" sum(conversions), sum(likes) FROM fact_ad_metrics_daily GROUP BY {keys}"
        )


def downgrade() -> None:
    op.drop_table("rollup_daily_region_device")
    op.drop_table("rollup_daily_platform")
