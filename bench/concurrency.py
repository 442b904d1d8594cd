"""The API under concurrent load: errors and latency of mixed requests at 100 / 200 / 500 in flight.

Starts the real API (uvicorn, a subprocess) on the database given, and the real inference worker
(`worker.inference_server`) serving a minilm-l6 LoRA classifier with random weights; creates a
project and key, uploads a file and creates two jobs (no training worker: they stay queued), opens
a few live event streams (SSE followers) that stay open through every level, then fires mixed
requests -- list jobs, get job, list events, list files, upload, predictions -- from N concurrent
clients per level and prints the error ratio and p50 / p99 / max latency per level.

    python bench/concurrency.py                                     # temp SQLite
    python bench/concurrency.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/tunehouse_bench
    python bench/concurrency.py --levels 100,200 --rounds 2 --no-predictions

An error is an exception (timeout, reset) or any status other than the one the request should get.
The database must exist; migrations are applied."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

KINDS = ("list_jobs", "get_job", "events", "list_files", "upload", "predictions")


@dataclass
class Level:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        p50, p99 = percentiles(self.latencies)
        errs = sum(self.errors.values())
        detail = ", ".join(f"{k}: {n}" for k, n in self.errors.most_common(6))
        kinds = "  ".join(f"{k} {a * 1000:.0f}/{b * 1000:.0f}" for k, (a, b) in
                          ((k, percentiles(v)) for k, v in self.by_kind.items()))
        return (f"{self.concurrency:>5} {errs:>6}/{self.requests:<6} {p50 * 1000:>8.0f} {p99 * 1000:>8.0f} "
                f"{max(self.latencies, default=0) * 1000:>8.0f} {self.requests / self.seconds:>7.1f}  {detail}\n"
                f"      p50/p99 ms by kind: {kinds}")


def percentiles(values: list[float]) -> tuple[float, float]:
    lat = sorted(values) or [float("nan")]
    return statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url}: not up after {deadline_s:.0f}s")


@contextmanager
def servers(env: dict[str, str], tmp: Path, api_port: int, inf_port: int | None
            ) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """The real inference worker (when `inf_port` is given) and the real API as subprocesses, up and
    healthy; stopped on exit (killed if stuck), then the count of tracebacks in their log is printed."""
    logs = (tmp / "servers.log").open("wb")
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, argv: list[str], port: int, deadline_s: float) -> None:
        procs[name] = subprocess.Popen([sys.executable, "-m", *argv, "--host", "127.0.0.1", "--port", str(port)],
                                       cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/healthz", procs[name], deadline_s)

    try:
        if inf_port is not None:
            start("worker", ["worker.inference_server"], inf_port, 120)
        start("api", ["uvicorn", "app.main:create_app", "--factory", "--log-level", "warning", "--no-access-log"],
              api_port, 60)
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a stuck server does not stop gracefully
                proc.kill()
                proc.wait()
        logs.close()
        print(f"tracebacks in the server logs ({logs.name}): "
              f"{(tmp / 'servers.log').read_text(errors='replace').count('Traceback')}")


def chat_rows(n: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def build_classifier(key: str) -> None:
    """A minilm-l6 LoRA classifier with random weights, saved where the inference worker loads it."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from app.kit.storage import get_storage
    from app.models_registry.catalog import local_base
    from ml import checkpoint
    from ml.checkpoint import CheckpointInfo
    from ml.config import Task, TrainingKind

    torch.set_num_threads(1)
    base = local_base("minilm-l6").path
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    peft = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))
    info = CheckpointInfo(task=Task.classification, training_type=TrainingKind.lora, base_model="minilm-l6",
                          step=1, epoch=1.0, label_names=["negative", "neutral", "positive"])
    checkpoint.save(get_storage().local_dir(key), peft, AutoTokenizer.from_pretrained(base), info)


def seed_database(url: str, with_model: bool) -> tuple[str, str | None]:
    """Migrate; a fresh project, its key and (with_model) a registered classifier. Returns (key, model)."""
    import uuid

    from sqlalchemy.orm import sessionmaker

    from app.auth.service import create_api_key, get_or_create_project
    from app.kit import ids
    from app.kit.db import make_engine
    from app.kit.migrate import upgrade_head
    from app.orm import File, FineTunedModel, Job

    upgrade_head(url)
    engine = make_engine(url)
    with sessionmaker(bind=engine)() as s:
        project = get_or_create_project(s, f"bench-{uuid.uuid4().hex[:8]}")
        key = create_api_key(s, project, "bench")
        model = None
        if with_model:
            storage_key = f"bench/concurrency-{uuid.uuid4().hex[:8]}"
            build_classifier(storage_key)
            file = File(id=ids.file_id(), project_id=project.id, purpose="fine-tune", filename="x.jsonl",
                        storage_key="files/none")
            s.add(file)
            s.flush()
            job = Job(id=ids.job_id(), project_id=project.id, model="minilm-l6", training_file=file.id, seed=0,
                      task="classification", training_type={"type": "lora"}, hyperparameters={},
                      config={"base_model": "minilm-l6"}, status="succeeded", suffix="bench")
            s.add(job)
            s.flush()
            model = f"ft:minilm-l6:{project.name}:bench:{job.id}"
            job.fine_tuned_model = model
            s.add(FineTunedModel(id=model, project_id=project.id, job_id=job.id, base_model="minilm-l6",
                                 task="classification", training_type="lora", storage_key=storage_key,
                                 info={"label_names": ["negative", "neutral", "positive"]}))
        s.commit()
    engine.dispose()
    return key, model


class Bench:
    def __init__(self, client: httpx.AsyncClient, model: str | None) -> None:
        self.client = client
        self.model = model
        self.jobs: list[str] = []
        self.upload_body = chat_rows(12)

    async def setup(self) -> None:
        r = await self.client.post("/v1/files", files={"file": ("train.jsonl", self.upload_body)},
                                   data={"purpose": "fine-tune"})
        r.raise_for_status()
        for seed in (1, 2):
            body = {"model": "tiny-lm", "training_file": r.json()["id"], "seed": seed, "max_seq_length": 64,
                    "hyperparameters": {"n_epochs": 1, "batch_size": 4}, "training_type": {"type": "lora"}}
            job = await self.client.post("/v1/fine_tuning/jobs", json=body)
            job.raise_for_status()
            self.jobs.append(job.json()["id"])

    def kinds(self) -> tuple[str, ...]:
        return KINDS if self.model else tuple(k for k in KINDS if k != "predictions")

    async def one(self, kind: str) -> httpx.Response:
        job = random.choice(self.jobs)
        c = self.client
        if kind == "list_jobs":
            return await c.get("/v1/fine_tuning/jobs", params={"limit": 10})
        if kind == "get_job":
            return await c.get(f"/v1/fine_tuning/jobs/{job}")
        if kind == "events":
            return await c.get(f"/v1/fine_tuning/jobs/{job}/events")
        if kind == "list_files":
            return await c.get("/v1/files", params={"limit": 10})
        if kind == "upload":
            return await c.post("/v1/files", files={"file": ("t.jsonl", self.upload_body)},
                                data={"purpose": "fine-tune"})
        return await c.post("/v1/predictions", json={"model": self.model, "input": "The delivery was late."})

    async def timed(self, kind: str, level: Level) -> None:
        start = time.perf_counter()
        try:
            r = await self.one(kind)
            if r.status_code != 200:
                level.errors[f"{kind} {r.status_code}"] += 1
        except httpx.HTTPError as exc:
            level.errors[f"{kind} {type(exc).__name__}"] += 1
        level.latencies.append(time.perf_counter() - start)
        level.by_kind.setdefault(kind, []).append(level.latencies[-1])
        level.requests += 1

    async def client_loop(self, i: int, rounds: int, level: Level) -> None:
        kinds = self.kinds()
        for r in range(rounds):
            await self.timed(kinds[(i + r) % len(kinds)], level)

    async def level(self, concurrency: int, rounds: int) -> Level:
        level = Level(concurrency)
        start = time.perf_counter()
        await asyncio.gather(*(self.client_loop(i, rounds, level) for i in range(concurrency)))
        level.seconds = time.perf_counter() - start
        return level

    async def follow(self, job: str, stop: asyncio.Event, errors: Counter[str]) -> None:
        """A live event stream held open until `stop` (the job stays queued: no terminal event)."""
        try:
            async with self.client.stream("GET", f"/v1/fine_tuning/jobs/{job}/events",
                                          params={"stream": "true"}) as r:
                if r.status_code != 200:
                    errors[f"sse {r.status_code}"] += 1
                    return
                async for _ in r.aiter_bytes():
                    if stop.is_set():
                        return
        except httpx.HTTPError as exc:
            if not stop.is_set():
                errors[f"sse {type(exc).__name__}"] += 1


async def run(base_url: str, key: str, model: str | None, levels: list[int], rounds: int, followers: int,
              timeout: float) -> list[Level]:
    # Idle connections expire before uvicorn's 5 s keep-alive does: no reuse of a connection it closes.
    limits = httpx.Limits(max_connections=max(levels) + followers + 10, max_keepalive_connections=100,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=timeout, limits=limits) as client:
        bench = Bench(client, model)
        await bench.setup()
        if model:  # load the adapter before timing
            (await bench.one("predictions")).raise_for_status()
        stop, sse_errors = asyncio.Event(), Counter[str]()
        streams = [asyncio.create_task(bench.follow(bench.jobs[i % 2], stop, sse_errors)) for i in range(followers)]
        results = []
        print(f"{'conc':>5} {'errors/requests':>13} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'req/s':>7}"
              "  errors by kind")
        for n in levels:
            results.append(await bench.level(n, rounds))
            print(results[-1].line(), flush=True)
        stop.set()
        for t in streams:
            t.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        print(f"SSE followers: {followers}, errors: {dict(sse_errors) or 0}")
        return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("TUNEHOUSE_BENCH_DATABASE_URL", ""),
                   help="SQLAlchemy URL (env TUNEHOUSE_BENCH_DATABASE_URL); empty -> a temp SQLite file")
    p.add_argument("--levels", default="100,200,500")
    p.add_argument("--rounds", type=int, default=3, help="requests per client per level, one after another")
    p.add_argument("--followers", type=int, default=10, help="SSE event streams held open meanwhile")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    p.add_argument("--no-predictions", action="store_true", help="no inference worker, no predictions")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tunehouse-bench-"))
    url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
    api_port, inf_port = free_port(), free_port()
    env = {**os.environ, "TUNEHOUSE_DATA_DIR": str(tmp / "data"), "TUNEHOUSE_DATABASE_URL": url,
           "TUNEHOUSE_BROKER_URL": "", "TUNEHOUSE_ARTIFACT_URL": str(tmp / "artifacts"),
           "TUNEHOUSE_LOG_JSON": "false", "TUNEHOUSE_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TUNEHOUSE_INTERNAL_TOKEN": secrets.token_urlsafe(16),
           "TUNEHOUSE_INFERENCE_URL": "" if args.no_predictions else f"http://127.0.0.1:{inf_port}"}
    os.environ.update(env)  # the seeding below writes the classifier where the worker reads it
    key, model = seed_database(url, with_model=not args.no_predictions)
    with servers(env, tmp, api_port, inf_port if model else None):
        print(f"database: {url.split('@')[-1]}  predictions: {'on' if model else 'off'}  rounds: {args.rounds}")
        levels = [int(x) for x in args.levels.split(",")]
        asyncio.run(run(f"http://127.0.0.1:{api_port}", key, model, levels, args.rounds, args.followers,
                        args.timeout))


if __name__ == "__main__":
    main()
