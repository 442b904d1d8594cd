"""Serving overhead of `/v1/predictions`: the real API (uvicorn subprocess) forwarding to the real
inference worker (`worker.inference_server`, a subprocess) vs the same model in-process, batched,
measured in the same run. Goal: >= 0.9x of the in-process limit at 8+ clients, >= 0.6x at 1 client.

    python bench/serving.py [--levels 1,8,32,128] [--seconds 10]
    python bench/serving.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/tunehouse_bench \\
        --redis-url redis://127.0.0.1:6379/12

One minilm-l6 LoRA classifier with random weights; one torch thread everywhere (the worker's and the
in-process engine's). The in-process limit is measured before and after the API levels (the mean is
the reference): load elsewhere on the machine then hits both alike. Ratios are what to read."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from app.inference import wire  # noqa: E402
from bench.concurrency import free_port, percentiles, seed_database, servers  # noqa: E402

TEXTS = ["The delivery was late and the package was damaged.", "Absolutely loved the service!",
         "It was okay, nothing special about it.", "Great value for the price and fast shipping."]
IN_PROCESS_CLIENTS = 32


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.seconds = 0.0
        self.cpu_ms: dict[str, float] = {}  # CPU per request, by process
        self.mean_batch = 0.0  # in the worker

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def line(self, label: str, limit: float) -> str:
        p50, p99 = percentiles(self.latencies)
        return (f"  {label:<18} {self.rate:8.1f}/s  p50 {p50 * 1000:6.1f} ms  p99 {p99 * 1000:7.1f} ms  "
                f"errors {self.errors}  -> {self.rate / limit:.2f}x in-process"
                + (f"  batch {self.mean_batch:.1f}" if self.mean_batch else "")
                + "".join(f"  {name} {ms:.1f}" for name, ms in self.cpu_ms.items()))


async def _drive(call: object, clients: int, seconds: float) -> Tally:
    tally = Tally()
    stop_at = time.perf_counter() + seconds

    async def loop(i: int) -> None:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            ok = await call(TEXTS[i % len(TEXTS)])  # type: ignore[operator]
            tally.latencies.append(time.perf_counter() - start)
            tally.errors += 0 if ok else 1
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    tally.seconds = time.perf_counter() - start
    return tally


def in_process(storage_key: str, model: str, seconds: float, clients: int = IN_PROCESS_CLIENTS) -> Tally:
    """The same model in this process, batched (max 32): at 32 clients, the limit the API is held to."""
    import torch

    from app.inference.local import LocalInference
    from app.inference.schemas import PredictionRequest
    from app.kit.storage import get_storage
    from app.models_registry.catalog import local_base
    from ml.inference.engine import Engine, EngineConfig
    from ml.inference.types import ModelRef

    torch.set_num_threads(1)
    engine = Engine(EngineConfig(max_batch_size=32, max_wait_ms=0.0, device="cpu"),
                    base_dir=lambda base: local_base(base).path, storage=get_storage())
    svc = LocalInference(engine, 300)
    ref = ModelRef(name=model, storage_key=storage_key, task="classification")

    async def call(text: str) -> bool:
        await svc.predictions(ref, PredictionRequest(model=model, input=text))
        return True

    async def both() -> Tally:
        await _drive(call, clients, 1.0)  # warm
        return await _drive(call, clients, seconds)

    try:
        return asyncio.run(both())
    finally:
        engine.close()


async def worker_direct(worker_url: str, token: str, storage_key: str, model: str, seconds: float) -> Tally:
    """1 client straight to the inference worker (no API hop): splits the 1-client latency."""
    ref = {"name": model, "storage_key": storage_key, "task": "classification"}
    async with httpx.AsyncClient(base_url=worker_url, headers={"Authorization": f"Bearer {token}"}) as client:
        async def call(text: str) -> bool:
            r = await client.post("/internal/v1/predictions", json={"ref": ref, "request": {"model": model,
                                                                                          "input": text}})
            return r.status_code == 200

        await _drive(call, 1, 0.5)
        return await _drive(call, 1, seconds)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batcher(worker_url: str, token: str) -> dict[str, int]:
    r = httpx.get(f"{worker_url}/internal/v1/stats", headers={"Authorization": f"Bearer {token}"})
    return dict(r.json().get("batcher", {})) if r.status_code == 200 else {}


async def through_api(base_url: str, key: str, model: str, levels: list[int], seconds: float,
                      pids: dict[str, int], stats: Callable[[], dict[str, int]]) -> list[Tally]:
    """The load comes through `app.inference.wire` (a keep-alive HTTP/1.1 client far lighter than httpx:
    with httpx, the load generator itself burned ~10 ms CPU per request at 128 clients on this box)."""
    pool = wire.pool_for(base_url, {"Authorization": f"Bearer {key}"})
    assert pool is not None

    async def call(text: str) -> bool:
        status, _ = await pool.post("/v1/predictions", json.dumps({"model": model, "input": text}).encode())
        return status == 200

    await _drive(call, 4, 1.0)  # load the adapter, open connections
    out = []
    for n in levels:
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        batches = await asyncio.to_thread(stats)
        out.append(await _drive(call, n, seconds))
        after = await asyncio.to_thread(stats)
        if after:
            out[-1].mean_batch = (after["items"] - batches["items"]) / max(1, after["batches"] - batches["batches"])
        out[-1].cpu_ms = {name: (cpu_seconds(pid) - before[name]) * 1000 / max(1, len(out[-1].latencies))
                          for name, pid in pids.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("TUNEHOUSE_BENCH_DATABASE_URL", ""),
                   help="SQLAlchemy URL; empty -> a temp SQLite file")
    p.add_argument("--redis-url", default="", help="broker (rate limits, cache generations); empty: embedded")
    p.add_argument("--levels", default="1,8,32,128")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per level")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="tunehouse-serving-"))
    url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
    api_port, inf_port = free_port(), free_port()
    env = {**os.environ, "TUNEHOUSE_DATA_DIR": str(tmp / "data"), "TUNEHOUSE_DATABASE_URL": url,
           "TUNEHOUSE_BROKER_URL": args.redis_url, "TUNEHOUSE_ARTIFACT_URL": str(tmp / "artifacts"),
           "TUNEHOUSE_LOG_JSON": "false", "TUNEHOUSE_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TUNEHOUSE_RATE_LIMIT_RPM": "0",
           "TUNEHOUSE_INTERNAL_TOKEN": secrets.token_urlsafe(16),
           "TUNEHOUSE_INFERENCE_URL": f"http://127.0.0.1:{inf_port}"}
    os.environ.update(env)
    key, model = seed_database(url, with_model=True)
    assert model is not None
    storage_key = _storage_key(url, model)
    with servers(env, tmp, api_port, inf_port) as procs:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; database {url.split('@')[-1]}; "
              f"broker {args.redis_url or 'embedded'}; {args.seconds:g}s per level")
        before = in_process(storage_key, model, args.seconds).rate
        same = {n: in_process(storage_key, model, args.seconds, clients=n).rate for n in levels}
        direct = asyncio.run(worker_direct(f"http://127.0.0.1:{inf_port}", env["TUNEHOUSE_INTERNAL_TOKEN"],
                                           storage_key, model, args.seconds))
        pids = {"cpu ms/req: api": procs["api"].pid, "worker": procs["worker"].pid, "client": os.getpid()}
        tallies = asyncio.run(through_api(f"http://127.0.0.1:{api_port}", key, model, levels, args.seconds, pids,
                                      lambda: batcher(f"http://127.0.0.1:{inf_port}", env["TUNEHOUSE_INTERNAL_TOKEN"])))
        after = in_process(storage_key, model, args.seconds).rate
        limit = (before + after) / 2
        print(f"  in-process batched {limit:8.1f}/s  (before {before:.1f}, after {after:.1f}; "
              f"{IN_PROCESS_CLIENTS} clients, max batch 32)")
        print("  in-process at the same client counts: "
              + ", ".join(f"{n}: {rate:.1f}/s ({rate / limit:.2f}x)" for n, rate in same.items()))
        print(direct.line("worker 1 client", limit) + "  (no API hop)")
        for n, tally in zip(levels, tallies, strict=True):
            print(tally.line(f"API {n} client{'s' if n > 1 else ''}", limit)
                  + f"  | {tally.rate / same[n]:.2f}x in-process at {n}")
        print(f"  goal: >= 0.9x at 8+ clients, >= 0.6x at 1 client; load average now {os.getloadavg()[0]:.1f}")


def _storage_key(url: str, model: str) -> str:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.kit.db import make_engine
    from app.orm import FineTunedModel

    engine = make_engine(url)
    with Session(engine) as s:
        key = s.scalar(select(FineTunedModel.storage_key).where(FineTunedModel.id == model))
    engine.dispose()
    assert key is not None
    return key


if __name__ == "__main__":
    main()
