"""pet version for ETags; usernames stored lower-cased, so they are unique regardless of case

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 09:55:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "pet", sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False)
    )
    # Fails (unique violation) if two existing names differ only in case: rename one first.
    op.execute('UPDATE "user" SET username = lower(username) WHERE username <> lower(username)')
    op.create_check_constraint("username_lower_case", "user", "username = lower(username)")


def downgrade() -> None:
    op.drop_constraint("username_lower_case", "user", type_="check")
    op.drop_column("pet", "version")
