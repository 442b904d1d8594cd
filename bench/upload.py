"""Uploads at disk speed: how fast a JSONL file is validated, against `cp` (the limit) and plain
parsing loops that check nothing (the strongest practical baselines).

Generates chat and classification JSONL files of 200 MB and 1 GB and a 1 M-row classification file
in a temp dir under /tmp (deleted afterwards; the 1 GB files are skipped with fewer than 5 GB free),
then measures for each, every method in its own child process (peak RSS is that process's):

  cp                 `cp FILE COPY` on the same disk (the page cache holds the file: disk speed at best)
  json loop          `for line in f: json.loads(line)`, no validation
  orjson loop        `for line in f: orjson.loads(line)`, no validation
  detailed           `validate_file(fast=False)`: every line through `Validator.json_line` (the old path)
  service            `app.files.service.validate_upload`, what the API runs on a staged upload
  http               the whole upload (multipart stream, hash, staging, validation, storing with fsync)
                     through the real app under uvicorn, httpx streaming the file from disk

and prints seconds, MB/s (wall; and per CPU second, as this machine may be loaded), the ratio to
`cp` and to the orjson loop, and peak RSS. The detailed and http rows run for files up to
--slow-max-mb (default 250).

    python bench/upload.py
    python bench/upload.py --sizes 200 --rows 0 --database-url postgresql+psycopg://postgres@127.0.0.1:5432/x
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1_000_000
MIN_FREE_FOR_1GB = 5 << 30
WORDS = ["the", "model", "learns", "to", "answer", "questions", "about", "data", "from", "a", "training", "set",
         "with", "short", "clear", "replies", "über", "naïve", "café", "数据", "训练", "模型", "🙂", "résumé"]
LABELS = ["positive", "negative", "neutral", "mixed", 7, 42]
BOUNDARY = "tunehouse-upload-bench"


# --- data -----------------------------------------------------------------------------------------

def _sentence(rnd: random.Random, n: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def _chat_line(rnd: random.Random) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": _sentence(rnd, 8)},
                         {"role": "user", "content": _sentence(rnd, rnd.randint(10, 80))},
                         {"role": "assistant", "content": _sentence(rnd, rnd.randint(20, 150))}]}


def _cls_line(rnd: random.Random, words: int) -> dict[str, Any]:
    return {"text": _sentence(rnd, rnd.randint(1, words)), "label": rnd.choice(LABELS)}


def _pool(kind: str, short: bool = False) -> bytes:
    """4096 distinct lines, half with non-ASCII escaped (json.dumps' default), half raw UTF-8."""
    rnd = random.Random(kind)
    lines = []
    for i in range(4096):
        rec = _chat_line(rnd) if kind == "chat" else _cls_line(rnd, 8 if short else 120)
        lines.append(json.dumps(rec, ensure_ascii=i % 2 == 0).encode() + b"\n")
    return b"".join(lines)


def write_file(path: Path, kind: str, *, size: int = 0, rows: int = 0) -> int:
    """`size` bytes (whole lines) or `rows` lines of repeated pools; returns the rows written."""
    pool = _pool(kind, short=rows > 0)
    pool_rows = pool.count(b"\n")
    written = 0
    with open(path, "wb") as f:
        if rows:
            for _ in range(rows // pool_rows):
                f.write(pool)
            rest = rows % pool_rows
            f.write(b"".join(pool.splitlines(keepends=True)[:rest]))
            return rows
        while f.tell() + len(pool) <= size:
            f.write(pool)
            written += pool_rows
    return written


# --- measurements (each in a child process) ---------------------------------------------------------

def _loop(path: Path, loads: Any) -> None:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                loads(line)


def _service(path: Path) -> None:
    from app.files.service import validate_upload
    from app.files.upload import HEAD_BYTES, Upload

    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    validate_upload(Upload(path=path, filename=path.name, size=path.stat().st_size, head=head))  # raises if bad


def _detailed(path: Path) -> None:
    from ml.data.formats import validate_file

    report = validate_file(path, "jsonl", max_line_bytes=4 << 20, fast=False)
    assert not report.errors, report.errors[:3]


def measure(method: str, path: Path) -> None:
    """Child: run one method, print {"seconds", "cpu"} as the last stdout line."""
    if method == "json":
        run = lambda: _loop(path, json.loads)  # noqa: E731
    elif method == "orjson":
        import orjson

        run = lambda: _loop(path, orjson.loads)  # noqa: E731
    elif method == "detailed":
        run = lambda: _detailed(path)  # noqa: E731
    else:
        import app.files.service  # noqa: F401  (imports are not the validator's time)

        run = lambda: _service(path)  # noqa: E731
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    print(json.dumps({"seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "rss": _peak_rss()}))


def _peak_rss() -> float:
    """This process's peak RSS (VmHWM; getrusage's maxrss would count the parent's pages at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return float("nan")


def child(cmd: list[str]) -> dict[str, Any]:
    """Run a child: its wall and CPU seconds and peak RSS as it reports them, or measured from here."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with {proc.returncode}")
    wall = time.perf_counter() - start
    if out.strip():
        return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]
    return {"seconds": wall, "cpu": float("nan"), "rss": float("nan")}


def cp(path: Path) -> dict[str, Any]:
    """`cp` to a sibling file (same disk), removed after."""
    dst = path.with_suffix(".copy")
    try:
        return child(["cp", str(path), str(dst)])
    finally:
        dst.unlink(missing_ok=True)


# --- the whole upload through the real app --------------------------------------------------------

class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        import psutil

        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.start_rss = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def _body(path: Path) -> Iterator[bytes]:
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
           f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
           "Content-Type: application/jsonl\r\n\r\n").encode()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


class Server:
    """uvicorn running the app on a temp data dir and the given (or a temp SQLite) database."""

    def __init__(self, tmp: Path, database_url: str) -> None:
        from bench.concurrency import free_port, seed_database

        url = database_url or f"sqlite:///{tmp / 'bench.db'}"
        self.port = free_port()
        self.env = {**os.environ, "TUNEHOUSE_DATA_DIR": str(tmp / "data"), "TUNEHOUSE_DATABASE_URL": url,
                    "TUNEHOUSE_BROKER_URL": "", "TUNEHOUSE_ARTIFACT_URL": str(tmp / "artifacts"),
                    "TUNEHOUSE_LOG_JSON": "false", "TUNEHOUSE_INFERENCE_URL": ""}
        os.environ.update(self.env)
        self.key, _ = seed_database(url, with_model=False)

    def __enter__(self) -> Server:
        from bench.concurrency import wait_http

        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                                      "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                                      "--no-access-log"], cwd=ROOT, env=self.env)
        wait_http(f"http://127.0.0.1:{self.port}/healthz", self.proc, 120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def upload(self, path: Path) -> dict[str, Any]:
        import httpx

        sampler = RssSampler(self.proc.pid)
        sampler.start()
        headers = {"Authorization": f"Bearer {self.key}",
                   "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        start = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{self.port}/v1/files", content=_body(path), headers=headers,
                       timeout=3600)
        seconds = time.perf_counter() - start
        sampler.done.set()
        sampler.join()
        if r.status_code != 200:
            raise SystemExit(f"upload failed: {r.status_code} {r.text[:500]}")
        httpx.delete(f"http://127.0.0.1:{self.port}/v1/files/{r.json()['id']}", headers=headers)
        return {"seconds": seconds, "cpu": float("nan"), "rss": sampler.peak,
                "rss_growth": sampler.peak - sampler.start_rss}


# --- report ---------------------------------------------------------------------------------------

def row(name: str, size: int, r: dict[str, Any], cp_s: float, orjson_s: float | None) -> str:
    mbs = size / MB / r["seconds"]
    cpu = f"{size / MB / r['cpu']:>8.0f}" if r["cpu"] == r["cpu"] and r["cpu"] > 0 else f"{'-':>8}"
    vs_orjson = f"{orjson_s / r['seconds']:>8.2f}" if orjson_s else f"{'-':>8}"
    rss = f"{r['rss'] / 2**20:>8.0f}" if r["rss"] == r["rss"] else f"{'-':>8}"
    extra = f"  (server RSS +{r['rss_growth'] / 2**20:.0f} MiB during the upload)" if "rss_growth" in r else ""
    return f"  {name:<10} {r['seconds']:>7.2f} {mbs:>8.1f} {cpu} {cp_s / r['seconds']:>7.3f} {vs_orjson} {rss}{extra}"


def bench_file(path: Path, rows: int, slow: bool, server: Server | None) -> None:
    size = path.stat().st_size
    print(f"\n{path.name}: {size / MB:.0f} MB, {rows:,} rows   (load average {os.getloadavg()[0]:.1f})")
    print(f"  {'method':<10} {'s':>7} {'MB/s':>8} {'MB/cpu-s':>8} {'x cp':>7} {'x orjson':>8} {'peak RSS MiB':>8}")
    runner = [sys.executable, str(Path(__file__).resolve()), "--measure"]
    results = {"cp": cp(path)}
    has_orjson = importlib.util.find_spec("orjson") is not None  # a dev dependency
    for method in ("json", *(("orjson",) if has_orjson else ()), *(("detailed",) if slow else ()), "service"):
        results[method] = child([*runner, method, str(path)])
    if server is not None and slow:
        results["http"] = server.upload(path)
    cp_s, orjson_s = results["cp"]["seconds"], results["orjson"]["seconds"] if has_orjson else None
    for name, r in results.items():
        print(row(name, size, r, cp_s, orjson_s), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="200,1000", help="MB, for each of chat and classification")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the short-line file (0: none)")
    p.add_argument("--slow-max-mb", type=int, default=250, help="detailed and http only up to this size")
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--database-url", default=os.environ.get("TUNEHOUSE_BENCH_DATABASE_URL", ""),
                   help="for the http row (env TUNEHOUSE_BENCH_DATABASE_URL); empty -> a temp SQLite file")
    p.add_argument("--measure", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure[0], Path(args.measure[1]))
        return

    tmp = Path(tempfile.mkdtemp(prefix="tunehouse-upload-bench-", dir="/tmp"))
    print(f"cpus: {os.cpu_count()}  load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}  "
          f"free in /tmp: {shutil.disk_usage(tmp).free / 2**30:.1f} GiB")
    try:
        server = None if args.no_http else Server(tmp, args.database_url).__enter__()
        try:
            for mb in (int(x) for x in args.sizes.split(",") if x):
                if mb >= 1000 and shutil.disk_usage(tmp).free < MIN_FREE_FOR_1GB:
                    print(f"\nskipping the {mb} MB files: under {MIN_FREE_FOR_1GB >> 30} GB free in /tmp")
                    continue
                for kind in ("chat", "classification"):
                    path = tmp / f"{kind}-{mb}MB.jsonl"
                    rows = write_file(path, kind, size=mb * MB)
                    bench_file(path, rows, mb <= args.slow_max_mb, server)
                    path.unlink()
            if args.rows:
                path = tmp / f"classification-{args.rows // 1000}k-rows.jsonl"
                write_file(path, "classification", rows=args.rows)
                bench_file(path, args.rows, path.stat().st_size / MB <= args.slow_max_mb, server)
                path.unlink()
        finally:
            if server is not None:
                server.__exit__()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbench peak RSS (this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
