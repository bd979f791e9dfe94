"""create ad metrics star schema

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 03:37:00.288919
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dim_age_group",
        sa.Column("age_id", sa.Integer(), nullable=False),
        sa.Column("age_range", sqlmodel.AutoString(length=100), nullable=False),
        sa.CheckConstraint(
            "btrim(age_range) <> ''", name=op.f("ck_dim_age_group_age_range_not_blank")
        ),
        sa.PrimaryKeyConstraint("age_id", name=op.f("pk_dim_age_group")),
        sa.UniqueConstraint("age_range", name=op.f("uq_dim_age_group_age_range")),
    )
    op.create_table(
        "dim_date",
        sa.Column("date_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("date_value", sa.Date(), nullable=False),
        sa.CheckConstraint(
            "date_id = extract(year from date_value) * 10000"
            " + extract(month from date_value) * 100 + extract(day from date_value)",
            name=op.f("ck_dim_date_date_id_is_yyyymmdd"),
        ),
        sa.PrimaryKeyConstraint("date_id", name=op.f("pk_dim_date")),
        sa.UniqueConstraint("date_value", name=op.f("uq_dim_date_date_value")),
    )
    op.create_table(
        "dim_device_type",
        sa.Column("device_type_id", sa.Integer(), nullable=False),
        sa.Column("device_type_name", sqlmodel.AutoString(length=100), nullable=False),
        sa.CheckConstraint(
            "btrim(device_type_name) <> ''",
            name=op.f("ck_dim_device_type_device_type_name_not_blank"),
        ),
        sa.PrimaryKeyConstraint("device_type_id", name=op.f("pk_dim_device_type")),
        sa.UniqueConstraint("device_type_name", name=op.f("uq_dim_device_type_device_type_name")),
    )
    op.create_table(
        "dim_gender",
        sa.Column("gender_id", sa.Integer(), nullable=False),
        sa.Column("gender_name", sqlmodel.AutoString(length=100), nullable=False),
        sa.CheckConstraint(
            "btrim(gender_name) <> ''", name=op.f("ck_dim_gender_gender_name_not_blank")
        ),
        sa.PrimaryKeyConstraint("gender_id", name=op.f("pk_dim_gender")),
        sa.UniqueConstraint("gender_name", name=op.f("uq_dim_gender_gender_name")),
    )
    op.create_table(
        "dim_placement",
        sa.Column("placement_id", sa.Integer(), nullable=False),
        sa.Column("placement_name", sqlmodel.AutoString(length=100), nullable=False),
        sa.CheckConstraint(
            "btrim(placement_name) <> ''", name=op.f("ck_dim_placement_placement_name_not_blank")
        ),
        sa.PrimaryKeyConstraint("placement_id", name=op.f("pk_dim_placement")),
        sa.UniqueConstraint("placement_name", name=op.f("uq_dim_placement_placement_name")),
    )
    op.create_table(
        "dim_platform",
        sa.Column("platform_id", sa.Integer(), nullable=False),
        sa.Column("platform_name", sqlmodel.AutoString(length=100), nullable=False),
        sa.CheckConstraint(
            "btrim(platform_name) <> ''", name=op.f("ck_dim_platform_platform_name_not_blank")
        ),
        sa.PrimaryKeyConstraint("platform_id", name=op.f("pk_dim_platform")),
        sa.UniqueConstraint("platform_name", name=op.f("uq_dim_platform_platform_name")),
    )
    op.create_table(
        "dim_region",
        sa.Column("region_id", sa.Integer(), nullable=False),
        sa.Column("region_name", sqlmodel.AutoString(length=100), nullable=False),
        sa.CheckConstraint(
            "btrim(region_name) <> ''", name=op.f("ck_dim_region_region_name_not_blank")
        ),
        sa.PrimaryKeyConstraint("region_id", name=op.f("pk_dim_region")),
        sa.UniqueConstraint("region_name", name=op.f("uq_dim_region_region_name")),
    )
    op.create_table(
        "fact_ad_metrics_daily",
        sa.Column("date_id", sa.Integer(), nullable=False),
        sa.Column("region_id", sa.Integer(), nullable=False),
        sa.Column("age_id", sa.Integer(), nullable=False),
        sa.Column("gender_id", sa.Integer(), nullable=False),
        sa.Column("platform_id", sa.Integer(), nullable=False),
        sa.Column("placement_id", sa.Integer(), nullable=False),
        sa.Column("device_type_id", sa.Integer(), nullable=False),
        sa.Column("impressions", sa.BigInteger(), nullable=False),
        sa.Column("clicks", sa.BigInteger(), nullable=False),
        sa.Column("cost", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.Column("conversions", sa.BigInteger(), nullable=False),
        sa.Column("likes", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "clicks >= 0", name=op.f("ck_fact_ad_metrics_daily_clicks_non_negative")
        ),
        sa.CheckConstraint(
            "conversions >= 0", name=op.f("ck_fact_ad_metrics_daily_conversions_non_negative")
        ),
        sa.CheckConstraint("cost >= 0", name=op.f("ck_fact_ad_metrics_daily_cost_non_negative")),
        sa.CheckConstraint(
            "impressions >= 0", name=op.f("ck_fact_ad_metrics_daily_impressions_non_negative")
        ),
        sa.CheckConstraint("likes >= 0", name=op.f("ck_fact_ad_metrics_daily_likes_non_negative")),
        sa.ForeignKeyConstraint(
            ["age_id"],
            ["dim_age_group.age_id"],
            name=op.f("fk_fact_ad_metrics_daily_age_id_dim_age_group"),
        ),
        sa.ForeignKeyConstraint(
            ["date_id"],
            ["dim_date.date_id"],
            name=op.f("fk_fact_ad_metrics_daily_date_id_dim_date"),
        ),
        sa.ForeignKeyConstraint(
            ["device_type_id"],
            ["dim_device_type.device_type_id"],
            name=op.f("fk_fact_ad_metrics_daily_device_type_id_dim_device_type"),
        ),
        sa.ForeignKeyConstraint(
            ["gender_id"],
            ["dim_gender.gender_id"],
            name=op.f("fk_fact_ad_metrics_daily_gender_id_dim_gender"),
        ),
        sa.ForeignKeyConstraint(
            ["placement_id"],
            ["dim_placement.placement_id"],
            name=op.f("fk_fact_ad_metrics_daily_placement_id_dim_placement"),
        ),
        sa.ForeignKeyConstraint(
            ["platform_id"],
            ["dim_platform.platform_id"],
            name=op.f("fk_fact_ad_metrics_daily_platform_id_dim_platform"),
        ),
        sa.ForeignKeyConstraint(
            ["region_id"],
            ["dim_region.region_id"],
            name=op.f("fk_fact_ad_metrics_daily_region_id_dim_region"),
        ),
        sa.PrimaryKeyConstraint(
            "date_id",
            "region_id",
            "age_id",
            "gender_id",
            "platform_id",
            "placement_id",
            "device_type_id",
            name=op.f("pk_fact_ad_metrics_daily"),
        ),
    )
    op.create_index(
        "ix_fact_ad_metrics_daily_date_id_brin",
        "fact_ad_metrics_daily",
        ["date_id"],
        unique=False,
        postgresql_using="brin",
        postgresql_with={"pages_per_range": 32},
    )


def downgrade() -> None:
    op.drop_index("ix_fact_ad_metrics_daily_date_id_brin", table_name="fact_ad_metrics_daily")
    op.drop_table("fact_ad_metrics_daily")
    op.drop_table("dim_region")
    op.drop_table("dim_platform")
    op.drop_table("dim_placement")
    op.drop_table("dim_gender")
    op.drop_table("dim_device_type")
    op.drop_table("dim_date")
    op.drop_table("dim_age_group")
