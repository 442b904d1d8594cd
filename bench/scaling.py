"""List endpoints and live event streams as the data grows.

Loads, in bulk (COPY on Postgres, executemany on SQLite), one project per size with N jobs, N files,
N fine-tuned models, and one job holding 10 N events and N/10 checkpoints (N = 10, 1k, 100k by default:
1M events at the top), plus noise projects; then, through the real app (uvicorn in a thread, httpx),
times the first page and a deep page (the `after` cursor of the middle row) of each list endpoint and
prints p50 per size and the ratio largest / smallest (flat: ~1). EXPLAIN ANALYZE of the statements a
deep page issues at the largest size shows which scans serve them.

Then live event streams: F followers (200) of one job while events arrive, with the shared poller
(`app.jobs.stream`) and with the per-follower polling it replaced (each follower its own query every
interval, re-created here as the baseline): events-table queries per poll interval, against the limit
of one.

    python bench/scaling.py                                   # Postgres, database tunehouse_bench_scaling
    python bench/scaling.py --sizes 10,1000 --events-per-job 10 --followers 50     # quick
    python bench/scaling.py --database-url sqlite:////tmp/scaling.db

The database is dropped and re-created (Postgres) or deleted (SQLite) first."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/tunehouse_bench_scaling"
CHUNK = 20_000
BIG_TABLES = ("jobs", "files", "job_events", "checkpoints", "fine_tuned_models")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=DEFAULT_URL)
    p.add_argument("--sizes", default="10,1000,100000", help="jobs / files / models per measured project")
    p.add_argument("--events-per-job", type=int, default=10, help="the events job holds this many x N events")
    p.add_argument("--noise-projects", type=int, default=4)
    p.add_argument("--noise-size", type=int, default=10_000, help="jobs, files and 5x events per noise project")
    p.add_argument("--reps", type=int, default=25, help="timed requests per page")
    p.add_argument("--followers", type=int, default=200)
    p.add_argument("--sse-seconds", type=float, default=6.0, help="events arrive for this long per mode")
    return p.parse_args()


# --- database ---------------------------------------------------------------------------------

def fresh_database(url: str) -> None:
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    import psycopg

    base, name = url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _maker(arg: Any, is_callable: bool) -> Callable[[], Any]:
    return (lambda: arg(None)) if is_callable else (lambda: arg)


def fillers(table: Any, given: list[str]) -> list[tuple[str, Callable[[], Any]]]:
    """The ORM's Python-side defaults of the columns a row leaves out (as a session would fill them)."""
    out: list[tuple[str, Callable[[], Any]]] = []
    for col in table.columns:
        if col.name in given or col.default is None:
            continue
        out.append((col.name, _maker(col.default.arg, col.default.is_callable)))
    return out


def bulk_insert(engine: Any, table: Any, rows: Iterator[dict[str, Any]]) -> int:
    """COPY on Postgres (JSON as text), executemany on SQLite; chunks of CHUNK rows."""
    n = 0
    chunk: list[dict[str, Any]] = []
    fill: list[tuple[str, Callable[[], Any]]] | None = None

    def flush() -> None:
        if not chunk:
            return
        cols = list(chunk[0])
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                cur = conn.connection.driver_connection.cursor()
                with cur.copy(f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as copy:
                    for r in chunk:
                        copy.write_row([json.dumps(v) if isinstance(v, dict | list) else v for v in r.values()])
            else:
                conn.execute(table.insert(), chunk)
        chunk.clear()

    for row in rows:
        if fill is None:
            fill = fillers(table, list(row))
        for name, make in fill:
            row[name] = make()
        chunk.append(row)
        n += 1
        if len(chunk) >= CHUNK:
            flush()
    flush()
    return n


def insert_events(engine: Any, job_id: str, n: int) -> None:
    """`n` metric events of one job: generated by the server on Postgres (the bulk of the data)."""
    from sqlalchemy import text

    from app.kit import ids
    from app.orm import JobEvent

    if engine.dialect.name != "postgresql":
        now = datetime.now(UTC)
        bulk_insert(engine, JobEvent.__table__, (
            {"id": ids.event_id(), "job_id": job_id, "level": "info", "type": "metrics", "message": f"step {i}",
             "data": {"step": i, "train_loss": 1.0 / (i + 1)}, "created_at": now - timedelta(microseconds=n - i)}
            for i in range(n)))
        return
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO job_events (id, job_id, level, type, message, data, created_at) "
            "SELECT 'ftevent-' || substr(md5(random()::text || g::text), 1, 24), :job, 'info', 'metrics', "
            "'step ' || g, jsonb_build_object('step', g, 'train_loss', 1.0 / (g + 1)), "
            "now() - (:n - g) * interval '1 microsecond' FROM generate_series(0, :n - 1) g"), {"job": job_id, "n": n})


class Project:
    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n
        self.id = f"proj_{name}"
        self.job_ids: list[str] = []
        self.file_ids: list[str] = []
        self.events_job = ""
        self.key = ""


def load(engine: Any, projects: list[Project], events_per_job: int) -> None:
    from sqlalchemy import text

    from app.auth.service import create_api_key
    from app.kit import ids
    from app.kit.db import get_sessionmaker
    from app.orm import Checkpoint, FineTunedModel, Job
    from app.orm import File as FileRow
    from app.orm import Project as ProjectRow

    now = datetime.now(UTC)
    with get_sessionmaker()() as s:
        for p in projects:
            row = ProjectRow(id=p.id, name=p.name, rpm_limit=0, max_queued_jobs=0, max_storage_bytes=0)
            s.add(row)
            s.flush()
            p.key = create_api_key(s, row, "bench")
        s.commit()
    for p in projects:
        t0 = time.perf_counter()
        p.file_ids = [ids.file_id() for _ in range(p.n)]
        p.job_ids = [ids.job_id() for _ in range(p.n)]
        p.events_job = p.job_ids[-1]  # the newest
        ts = [now - timedelta(milliseconds=p.n - i) for i in range(p.n)]
        bulk_insert(engine, FileRow.__table__, (
            {"id": f, "project_id": p.id, "purpose": "fine-tune", "filename": f"f{i}.jsonl", "bytes": 100,
             "status": "processed", "rows": 10, "storage_key": f"files/{f}", "created_at": ts[i]}
            for i, f in enumerate(p.file_ids)))
        bulk_insert(engine, Job.__table__, (
            {"id": j, "project_id": p.id, "model": "minilm-l6", "training_file": p.file_ids[0], "seed": 0,
             "task": "classification", "training_type": {"type": "lora"}, "hyperparameters": {},
             "config": {"base_model": "minilm-l6"}, "status": "queued" if i % 100 == 0 else "succeeded",
             "suffix": "b", "created_at": ts[i]}
            for i, j in enumerate(p.job_ids)))
        bulk_insert(engine, FineTunedModel.__table__, (
            {"id": f"ft:minilm-l6:{p.name}:b:{j}", "project_id": p.id, "job_id": j, "base_model": "minilm-l6",
             "task": "classification", "training_type": "lora", "storage_key": f"models/{j}", "created_at": ts[i]}
            for i, j in enumerate(p.job_ids)))
        n_events = events_per_job * p.n
        insert_events(engine, p.events_job, n_events)
        bulk_insert(engine, Checkpoint.__table__, (
            {"id": ids.checkpoint_id(), "job_id": p.events_job, "project_id": p.id, "step": i, "epoch": 1.0,
             "storage_key": f"ckpt/{i}", "fine_tuned_model_checkpoint": f"ft:x:{p.name}:b:{p.events_job}:ckpt-step-{i}"}
            for i in range(p.n // 10 + 1)))
        print(f"  loaded {p.name}: {p.n} jobs/files/models, {n_events} events, {p.n // 10 + 1} checkpoints "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE"))


# --- the app --------------------------------------------------------------------------------

@contextmanager
def live_server(app: Any) -> Iterator[str]:
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                                           access_log=False, backlog=2048))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def statements(engine: Any, match: Callable[[str], bool]) -> Iterator[list[tuple[str, Any]]]:
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def hook(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if match(statement):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def is_select(statement: str) -> bool:
    return statement.lstrip().upper().startswith("SELECT")


def middle_ids(engine: Any, p: Project) -> dict[str, str]:
    """The `after` cursor of a page halfway down each list."""
    from sqlalchemy import text

    q = {
        "jobs": ("SELECT id FROM jobs WHERE project_id = :p ORDER BY created_at DESC, id DESC", {"p": p.id}),
        "files": ("SELECT id FROM files WHERE project_id = :p ORDER BY created_at DESC, id DESC", {"p": p.id}),
        "events": ("SELECT id FROM job_events WHERE job_id = :j ORDER BY seq DESC", {"j": p.events_job}),
        "checkpoints": ("SELECT id FROM checkpoints WHERE job_id = :j ORDER BY step DESC", {"j": p.events_job}),
        "models": ("SELECT id FROM fine_tuned_models WHERE project_id = :p ORDER BY created_at DESC, id DESC",
                   {"p": p.id}),
    }
    out = {}
    with engine.connect() as conn:
        for name, (sql, params) in q.items():
            total = conn.execute(text(f"SELECT count(*) FROM ({sql}) t"), params).scalar_one()
            out[name] = conn.execute(text(f"{sql} LIMIT 1 OFFSET :o"), {**params, "o": total // 2}).scalar_one()
    return out


def endpoints(p: Project) -> dict[str, str]:
    return {"jobs": "/v1/fine_tuning/jobs?limit=20", "files": "/v1/files?limit=20",
            "events": f"/v1/fine_tuning/jobs/{p.events_job}/events?limit=20",
            "checkpoints": f"/v1/fine_tuning/jobs/{p.events_job}/checkpoints?limit=20",
            "models": "/v1/models?limit=20"}


class SqlClock:
    """Time spent in SQL statements (all threads), read around one request at a time."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.total = 0.0
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, *args: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def _after(self, conn: Any, *args: Any) -> None:
        self.total += time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())


def bench_lists(base: str, engine: Any, projects: list[Project], reps: int) -> None:
    """Each page of each size once per round, sizes interleaved (the box's load hits them alike)."""
    sql = SqlClock(engine)
    cases: list[tuple[str, Project, str, int]] = []
    for p in projects:
        mids = middle_ids(engine, p)
        for name, url in endpoints(p).items():
            cases += [(f"{name} first", p, url, reps), (f"{name} deep", p, f"{url}&after={mids[name]}", reps)]
        cases.append(("models (all, OpenAI shape)", p, "/v1/models", max(3, reps // 8)))
    http_s: dict[str, dict[int, list[float]]] = {}
    sql_s: dict[str, dict[int, list[float]]] = {}
    clients = {p.n: httpx.Client(base_url=base, headers={"Authorization": f"Bearer {p.key}"}, timeout=600)
               for p in projects}
    try:
        for rep in range(reps + 1):
            for name, p, url, n in cases:
                if rep > n:
                    continue
                t0, sql0 = time.perf_counter(), sql.total
                clients[p.n].get(url).raise_for_status()
                if rep:  # the first round warms up
                    http_s.setdefault(name, {}).setdefault(p.n, []).append(time.perf_counter() - t0)
                    sql_s.setdefault(name, {}).setdefault(p.n, []).append(sql.total - sql0)
    finally:
        for c in clients.values():
            c.close()
    sizes = [p.n for p in projects]
    for title, table in (("request (HTTP, through the app)", http_s), ("SQL time per request", sql_s)):
        print(f"\n{title}: p50 ms ({reps} requests per page; deep: `after` = the middle row)")
        print(f"{'endpoint':<22}" + "".join(f"{n:>12}" for n in sizes) + f"{'ratio':>10}")
        for name, by_size in table.items():
            p50 = {n: statistics.median(v) * 1000 for n, v in by_size.items()}
            ratio = p50[sizes[-1]] / p50[sizes[0]]
            print(f"{name:<22}" + "".join(f"{p50[n]:>12.2f}" for n in sizes) + f"{ratio:>10.2f}")
    print(f"(ratio: p50 at {sizes[-1]} / p50 at {sizes[0]}; flat = 1)")


def explain(base: str, engine: Any, p: Project) -> None:
    """EXPLAIN ANALYZE of each SELECT a deep page issues (the app's own statements and parameters)."""
    mids = middle_ids(engine, p)
    pg = engine.dialect.name == "postgresql"
    print(f"\nplans of deep pages at {p.n} (EXPLAIN {'ANALYZE' if pg else 'QUERY PLAN'})")
    bad = 0
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {p.key}"}, timeout=600) as client:
        for name, url in endpoints(p).items():
            with statements(engine, lambda s: is_select(s) and any(f"FROM {t}" in s for t in BIG_TABLES)) as seen:
                client.get(f"{url}&after={mids[name]}").raise_for_status()
            raw = engine.raw_connection()
            try:
                cur = raw.cursor()
                for sql, params in seen:
                    cur.execute(("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " if pg else "EXPLAIN QUERY PLAN ") + sql,
                                params)
                    plan = [str(r[0] if pg else r[-1]) for r in cur.fetchall()]
                    scans = [ln.strip() for ln in plan if "Scan" in ln or "SCAN" in ln or "SEARCH" in ln
                             or "Index Cond" in ln or "Removed by Filter" in ln]
                    seq = [s for s in scans if "Seq Scan on" in s or (s.startswith("SCAN ") and "INDEX" not in s)]
                    bad += len(seq)
                    head = " ".join(sql.split())[:110]
                    print(f"  [{name}] {head}...\n    " + "\n    ".join(scans[:6])
                          + ("\n    ^ FULL SCAN" if seq else ""))
            finally:
                raw.close()
    print(f"  full-table scans in deep-page plans: {bad}")


# --- live event streams ------------------------------------------------------------------------

def legacy_follow(request: Any, job_id: str, seq: int) -> AsyncIterator[bytes]:
    """The per-follower polling `app.jobs.stream` replaced: every follower, its own query each interval."""
    from app.jobs import service
    from app.jobs.stream import POLL_S, read_frames
    from app.kit.deps import run_db

    async def gen() -> AsyncIterator[bytes]:
        nonlocal seq
        while not await request.is_disconnected():
            frames, status = await run_db(request, read_frames, job_id, seq)
            for n, chunk in frames:
                seq = n
                yield chunk
            if not frames and status in service.TERMINAL:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n".encode()
                return
            await asyncio.sleep(POLL_S)

    return gen()


def new_job(p: Project) -> str:
    from app.jobs.events import add_event
    from app.kit import ids
    from app.kit.db import get_sessionmaker
    from app.orm import Job

    with get_sessionmaker()() as s:
        job = Job(id=ids.job_id(), project_id=p.id, model="minilm-l6", training_file=p.file_ids[0], seed=0,
                  task="classification", training_type={"type": "lora"}, hyperparameters={}, config={},
                  status="running")
        s.add(job)
        s.flush()
        add_event(s, job.id, "started")
        s.commit()
        return job.id


def append(job_id: str, status: str | None = None) -> None:
    from sqlalchemy import update

    from app.jobs.events import add_event
    from app.kit.db import get_sessionmaker
    from app.orm import Job

    with get_sessionmaker()() as s:
        add_event(s, job_id, "tick")
        if status:
            s.execute(update(Job).where(Job.id == job_id).values(status=status))
        s.commit()


async def follow_window(base: str, engine: Any, p: Project, followers: int, seconds: float) -> tuple[int, float, str]:
    """`followers` streams of a new job; events arrive every poll interval for `seconds`; then the job
    ends. Returns events-table SELECTs during the window, the window's length, and how many followers
    got every event once, in order, then the end."""
    from app.jobs.stream import POLL_S

    job_id = new_job(p)
    got: list[list[int]] = [[] for _ in range(followers)]
    ended = [False] * followers

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true") as r:
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    got[i].append(int(line[4:]))
                elif line == "event: end":
                    ended[i] = True

    async def until(cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 300
        while not cond() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    limits = httpx.Limits(max_connections=followers + 10)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {p.key}"}, timeout=600,
                                 limits=limits) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(followers)]
        await until(lambda: all(len(g) == 1 for g in got))
        sent = 1
        with statements(engine, lambda s: is_select(s) and "FROM job_events" in s) as seen:
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                await asyncio.to_thread(append, job_id)
                sent += 1
                await asyncio.sleep(POLL_S)
            await until(lambda: all(len(g) == sent for g in got))
            elapsed, queries = time.monotonic() - t0, len(seen)
        await asyncio.to_thread(append, job_id, "succeeded")
        await until(lambda: all(t.done() for t in tasks))
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = Counter(repr(r)[:80] for r in results if isinstance(r, BaseException))
    good = sum(g == sorted(set(g)) and len(g) == sent + 1 and e for g, e in zip(got, ended, strict=True))
    return queries, elapsed, f"{good}/{followers}" + (f"; errors: {dict(errors)}" if errors else "")


def bench_streams(app: Any, engine: Any, p: Project, followers: int, seconds: float) -> None:
    import app.jobs.router as router
    from app.jobs.stream import POLL_S, follow

    print(f"\nlive event streams: {followers} followers of one job, an event every {POLL_S} s for {seconds:.0f} s")
    rows = {}
    for mode, fn in (("shared poller", follow), ("per-follower polls", legacy_follow)):
        router.follow = fn  # type: ignore[assignment]
        try:
            with live_server(app) as base:
                queries, elapsed, ok = asyncio.run(follow_window(base, engine, p, followers, seconds))
        finally:
            router.follow = follow  # type: ignore[assignment]
        per_interval = queries / (elapsed / POLL_S)
        rows[mode] = per_interval
        print(f"  {mode:<20} {queries:>6} events queries in {elapsed:.1f} s = {per_interval:>7.1f} per interval  "
              f"(followers served every event once, in order, then end: {ok})")
    print(f"  limit: 1 per interval; per-follower / shared = {rows['per-follower polls'] / rows['shared poller']:.0f}x")


def main() -> None:
    args = parse()
    os.environ["TUNEHOUSE_DATABASE_URL"] = args.database_url
    os.environ["TUNEHOUSE_RUN_REAPER"] = "false"
    os.environ["TUNEHOUSE_RATE_LIMIT_RPM"] = "0"
    os.environ.setdefault("TUNEHOUSE_LOG_LEVEL", "WARNING")
    from app.kit.db import get_engine
    from app.kit.migrate import upgrade_head
    from app.main import create_app

    fresh_database(args.database_url)
    upgrade_head(args.database_url)
    engine = get_engine()
    sizes = [int(s) for s in args.sizes.split(",")]
    projects = [Project(f"scale{n}", n) for n in sizes]
    noise = [Project(f"noise{k}", args.noise_size) for k in range(args.noise_projects)]
    print(f"loading ({engine.dialect.name}): sizes {sizes}, {args.noise_projects} noise projects of "
          f"{args.noise_size}", flush=True)
    t0 = time.perf_counter()
    load(engine, projects, args.events_per_job)
    if noise:
        load(engine, noise, 5)
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)

    app = create_app()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with live_server(app) as base:
        bench_lists(base, engine, projects, args.reps)
        explain(base, engine, projects[-1])
    bench_streams(app, engine, projects[0], args.followers, args.sse_seconds)


if __name__ == "__main__":
    main()
