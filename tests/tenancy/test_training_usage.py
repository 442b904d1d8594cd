"""A job trained for real in this process is metered: its trained tokens once it succeeds, and the
attempt's device-seconds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from app.tenancy import service
from tests.jobs.realdb import committed_clients, train
from tests.ml.training import datasets as ds

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_trained_job_is_metered(committed_db: sessionmaker[Session]) -> None:
    client = committed_clients(committed_db, "metered")[0]
    job = train(client, ds.sentiment_rows(16), "classification", "freeze", 1e-2)
    with committed_db() as s:
        usage = service.usage(s, service.get_project(s, "metered"))
    assert job["trained_tokens"] > 0 and usage.trained_tokens == job["trained_tokens"]
    assert usage.device_seconds > 0 and usage.stored_bytes > 0  # the upload and the job's result file
    assert (usage.queued_jobs, usage.running_jobs) == (0, 0)
