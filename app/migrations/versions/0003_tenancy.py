"""tenancy: per-project limits on projects, metered usage per project

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 11:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.kit.db

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIMITS = [('rpm_limit', sa.Integer()), ('max_queued_jobs', sa.Integer()), ('max_running_jobs', sa.Integer()),
          ('max_storage_bytes', sa.BigInteger()), ('max_file_bytes', sa.BigInteger())]


def upgrade() -> None:
    with op.batch_alter_table('projects') as batch:
        for name, type_ in LIMITS:
            batch.add_column(sa.Column(name, type_, nullable=True))
    op.create_table('project_usage',
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('trained_tokens', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('device_seconds', sa.Float(), server_default='0', nullable=False),
    sa.Column('predictions', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('tokens_served', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('updated_at', app.kit.db.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('project_id')
    )


def downgrade() -> None:
    op.drop_table('project_usage')
    with op.batch_alter_table('projects') as batch:
        for name, _ in reversed(LIMITS):
            batch.drop_column(name)
