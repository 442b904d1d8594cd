"""scaling indexes: keyset list pages seek on (project, created_at, id); queue and quota counts

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 14:00:00.000000
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, table, columns): each replaces an index that is a prefix of it (dropped below), or is new.
NEW = [
    ('ix_files_project_created_id', 'files', ['project_id', 'created_at', 'id']),
    ('ix_jobs_project_created_id', 'jobs', ['project_id', 'created_at', 'id']),
    ('ix_jobs_status_created', 'jobs', ['status', 'created_at']),
    ('ix_jobs_project_status', 'jobs', ['project_id', 'status']),
    ('ix_fine_tuned_models_project_created', 'fine_tuned_models', ['project_id', 'created_at']),
]
OLD = [
    ('ix_files_project_id', 'files', ['project_id']),
    ('ix_files_created_at', 'files', ['created_at']),  # unscoped: tempted the planner into filtering by project
    ('ix_jobs_project_created', 'jobs', ['project_id', 'created_at']),
    ('ix_jobs_status', 'jobs', ['status']),
    ('ix_fine_tuned_models_project_id', 'fine_tuned_models', ['project_id']),
]


def upgrade() -> None:
    for name, table, cols in NEW:
        op.create_index(name, table, cols, unique=False)
    for name, table, _ in OLD:
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    for name, table, cols in OLD:
        op.create_index(name, table, cols, unique=False)
    for name, table, _ in NEW:
        op.drop_index(name, table_name=table)
