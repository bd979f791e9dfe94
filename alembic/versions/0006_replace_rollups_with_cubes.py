"""replace the two rollups by the daily and monthly cubes

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 12:40:00.000000
"""

import importlib.util
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The facts' dimension columns in the order of the cubes' set masks (bit 0 first) and keys.
DIMENSION_COLUMNS = (
    "region_id", "age_id", "gender_id", "platform_id", "placement_id", "device_type_id"
)  # fmt: skip
SUMS = "sum(impressions), sum(clicks), (sum(cost) * 100)::bigint, sum(conversions), sum(likes)"
MEASURES = ("impressions", "clicks", "cost_cents", "conversions", "likes")


def _cube(name: str, period: str, key_count: int) -> None:
    keys = [f"k{n}" for n in range(1, key_count + 1)]
    op.create_table(
        name,
        sa.Column("set_id", sa.SmallInteger(), nullable=False),
        sa.Column(period, sa.Integer(), nullable=False),
        *(sa.Column(key, sa.Integer(), nullable=False) for key in keys),
        *(sa.Column(measure, sa.BigInteger(), nullable=False) for measure in MEASURES),
    )
    op.create_index(op.f(f"ix_{name}_set_id_{period}"), name, ["set_id", period])


def upgrade() -> None:
    op.drop_table("rollup_daily_region_device")
    op.drop_table("rollup_daily_platform")
    _cube("cube_daily", "date_id", 3)
    _cube("cube_monthly", "month_id", 6)
    # Facts loaded before this revision are summed into the cubes: each set of dimensions (its
    # mask has a bit per column of DIMENSION_COLUMNS), per day if it has at most three, and per
    # month.
    for size in range(len(DIMENSION_COLUMNS) + 1):
        for columns in combinations(DIMENSION_COLUMNS, size):
            mask = sum(1 << DIMENSION_COLUMNS.index(c) for c in columns)
            grains = [("cube_monthly", "date_id / 100", 6)]
            if size <= 3:
                grains.append(("cube_daily", "date_id", 3))
            for table, period, key_count in grains:
                keys = ", ".join([*columns, *["0"] * (key_count - size)])
                grouped = ", ".join([period, *columns])
                op.execute(
                    f"INSERT INTO {table} SELECT {mask}, {period}, {keys}, {SUMS}"  # noqa: S608
                    f" FROM fact_ad_metrics_daily GROUP BY {grouped}"
                )


def downgrade() -> None:
    op.drop_table("cube_monthly")
    op.drop_table("cube_daily")
    # The rollups as revision 0004 made them, summed from the facts again.
    path = Path(__file__).with_name("0004_create_metrics_rollups.py")
    spec = importlib.util.spec_from_file_location("rollups_0004", path)
    assert spec is not None
    assert spec.loader is not None
    rollups = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rollups)
    rollups.upgrade()
