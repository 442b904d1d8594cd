"""gangs: jobs.devices / jobs.nodes (capacity-aware claims) and gang_seats (multi-node attempts)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 14:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.kit.db

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('devices', sa.Integer(), server_default='1', nullable=False))
        batch.add_column(sa.Column('nodes', sa.Integer(), server_default='1', nullable=False))
    op.create_index('ix_jobs_status_devices', 'jobs', ['status', 'devices'], unique=False)
    _backfill()
    op.create_table('gang_seats',
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('node_rank', sa.Integer(), nullable=False),
    sa.Column('endpoint', sa.String(length=256), nullable=False),
    sa.Column('spec', app.kit.db.JSONType, nullable=False),
    sa.Column('worker_id', sa.String(length=256), nullable=True),
    sa.Column('heartbeat_at', app.kit.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('go', sa.Boolean(), nullable=False),
    sa.Column('created_at', app.kit.db.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'attempt', 'node_rank')
    )
    op.create_index(op.f('ix_gang_seats_worker_id'), 'gang_seats', ['worker_id'], unique=False)


def _backfill() -> None:
    """Existing jobs take their devices from their config (nodes > 1 was refused until now)."""
    jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('config', app.kit.db.JSONType),
                    sa.column('devices', sa.Integer))
    conn = op.get_bind()
    for job_id, config in conn.execute(sa.select(jobs.c.id, jobs.c.config)).all():
        devices = int(((config or {}).get('resources') or {}).get('devices', 1))
        if devices != 1:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(devices=devices))


def downgrade() -> None:
    op.drop_index(op.f('ix_gang_seats_worker_id'), table_name='gang_seats')
    op.drop_table('gang_seats')
    op.drop_index('ix_jobs_status_devices', table_name='jobs')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('nodes')
        batch.drop_column('devices')
