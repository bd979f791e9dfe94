"""create pet

Revision ID: 0001
Revises:
Create Date: 2026-11-24 03:14:06.727564
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pet",
        sa.Column("name", sqlmodel.AutoString(length=100), nullable=False),
        sa.Column("pet_type", sqlmodel.AutoString(length=30), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pet")),
    )
    op.create_index(op.f("ix_pet_created_at"), "pet", ["created_at"], unique=False)
    op.create_index(op.f("ix_pet_pet_type"), "pet", ["pet_type"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_pet_pet_type"), table_name="pet")
    op.drop_index(op.f("ix_pet_created_at"), table_name="pet")
    op.drop_table("pet")
