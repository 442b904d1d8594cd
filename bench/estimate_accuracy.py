"""Duration estimates vs actual run time, for the README's example jobs, through the real service.

Starts `tunehouse serve` in embedded mode (SQLite, filesystem broker, the supervised training worker)
on a data directory of its own, then for each example: uploads its files, asks
`POST /v1/fine_tuning/estimate`, creates the job, polls it until it ends (recording `estimated_finish`
at each poll), and compares the estimate with the actual durations:

  created->finished  (what a user waits: queue + the run) against `estimated_seconds`
  started->finished  (the worker's run)                   against `estimated_seconds - queue_seconds`

Ratios (estimate / actual) come first, one line per example; the goal is 0.7-1.3. Then each phase
as estimated (`breakdown`) and as measured from the job's events (setup = start -> "Training N
examples", train + evaluations + checkpoints, tail = last checkpoint -> finished: final save and
the evaluation report), and how truthful the live `estimated_finish` was (its error against the
real finish at 25 / 50 / 75 % of the run). `--write FILE` writes the measured rates in the shape of
`app/jobs/eta.py`'s `DEFAULT_SPEEDS` for an operator to copy.

    python bench/estimate_accuracy.py [--examples quickstart,smollm2-json,tiny-lm] [--data-dir DIR]
        [--write rates.json]

`--data-dir` reuses a directory (SmolLM2's one-off GGUF conversion then happens only once); the
default is a fresh temporary one, so the first SmolLM2 job includes the conversion, as a user's does.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Example:
    name: str
    train: str
    valid: str | None
    body: dict[str, Any]


# The README's jobs, with exactly its settings.
EXAMPLES = {
    "quickstart": Example("quickstart", "sentiment_quick.jsonl", "sentiment_valid.jsonl", {
        "model": "minilm-l6", "task": "classification", "hyperparameters": {"n_epochs": 1},
        "learning_rate": 1e-3}),
    "sentiment": Example("sentiment", "sentiment.jsonl", "sentiment_valid.jsonl", {
        "model": "minilm-l6", "task": "classification", "hyperparameters": {"n_epochs": 2},
        "learning_rate": 1e-3}),
    "smollm2-json": Example("smollm2-json", "qa_json.jsonl", "qa_json_valid.jsonl", {
        "model": "smollm2-135m", "seed": 1, "hyperparameters": {"n_epochs": 1, "batch_size": 4},
        "training_type": "lora", "learning_rate": 2e-3}),
    "tiny-lm": Example("tiny-lm", "geography_chat.jsonl", None, {
        "model": "tiny-lm", "training_type": "full", "learning_rate": 5e-3, "hyperparameters": {"n_epochs": 10}}),
    "dpo": Example("dpo", "qa_json_prefs.jsonl", "qa_json_prefs_valid.jsonl", {
        "model": "smollm2-135m", "training_type": "lora", "learning_rate": 1e-3,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1, "batch_size": 4}}}}),
}


@dataclass
class Outcome:
    name: str
    estimate: dict[str, Any]
    job: dict[str, Any]
    events: list[dict[str, Any]]
    polls: list[tuple[float, int | None, str]] = field(default_factory=list)  # (now, estimated_finish, status)
    wall: float = 0.0  # seconds from the create request to seeing the job end

    @property
    def total(self) -> float:
        return float(self.job["finished_at"] - self.job["created_at"])

    @property
    def run(self) -> float:
        return float(self.job["finished_at"] - (self.job.get("started_at") or self.job["created_at"]))


# --- the server -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, port: int, threads: int | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEHOUSE_")}
    env.update(TUNEHOUSE_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TUNEHOUSE_LOG_JSON="false")
    if threads:
        env["TUNEHOUSE_TORCH_THREADS"] = str(threads)
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - the child keeps it
    exe = Path(sys.executable).with_name("tunehouse")
    return subprocess.Popen([str(exe), "serve", "--port", str(port)], env=env, stdout=log, stderr=log,
                            cwd=ROOT, start_new_session=True)


def wait_ready(base: str, proc: subprocess.Popen[bytes], data_dir: Path, deadline_s: float = 180) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {data_dir / 'server.log'}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200 and (data_dir / "api_key").exists():
                return (data_dir / "api_key").read_text().strip()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server not ready in time")


# --- one example ----------------------------------------------------------------------------------

def upload(client: httpx.Client, name: str) -> str:
    with (SAMPLES / name).open("rb") as fh:
        r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (name, fh)})
    r.raise_for_status()
    return str(r.json()["id"])


def run_example(client: httpx.Client, ex: Example, timeout_s: float) -> Outcome:
    body = {**ex.body, "training_file": upload(client, ex.train)}
    if ex.valid:
        body["validation_file"] = upload(client, ex.valid)
    est = client.post("/v1/fine_tuning/estimate", json=body)
    est.raise_for_status()
    t0 = time.time()
    created = client.post("/v1/fine_tuning/jobs", json=body)
    created.raise_for_status()
    job_id = created.json()["id"]
    out = Outcome(ex.name, est.json(), created.json(), [])
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        out.polls.append((time.time(), job.get("estimated_finish"), job["status"]))
        if job["status"] in TERMINAL:
            out.job, out.wall = job, time.time() - t0
            break
        time.sleep(1.0)
    else:
        raise SystemExit(f"{ex.name}: {job_id} did not finish in {timeout_s:.0f} s")
    if out.job["status"] != "succeeded":
        raise SystemExit(f"{ex.name}: {job_id} {out.job['status']}: {out.job.get('error')}")
    out.events = events(client, job_id)
    return out


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        rows += page["data"]
        if not page.get("has_more") or not page["data"]:
            break
        after = page["data"][-1]["id"]
    return sorted(rows, key=lambda e: (e["created_at"], e.get("seq", 0)))


# --- measured phases ------------------------------------------------------------------------------

def phases(o: Outcome) -> dict[str, float]:
    """Seconds per phase from the events (whole-second timestamps: +-1 s each)."""
    ev = o.events
    started = o.job.get("started_at") or o.job["created_at"]
    announce = next((e["created_at"] for e in ev if e["message"].startswith("Training ")), started)
    ckpts = [e for e in ev if e["message"].startswith("Checkpoint saved")]
    metrics = [e for e in ev if e.get("type") == "metrics"]
    last_ckpt = ckpts[-1]["created_at"] if ckpts else o.job["finished_at"]
    evals = sum(_gap(ev, e) for e in metrics if "valid_loss" in (e.get("data") or {}))
    saves = sum(_gap(ev, e) for e in ckpts)
    loop = last_ckpt - announce
    return {"queue": started - o.job["created_at"], "setup": announce - started,
            "train": max(0.0, loop - evals - saves), "evaluations": evals, "checkpoints": saves,
            "tail": o.job["finished_at"] - last_ckpt}


def _gap(ev: list[dict[str, Any]], e: dict[str, Any]) -> float:
    i = ev.index(e)
    return float(e["created_at"] - ev[i - 1]["created_at"]) if i else 0.0


def train_tokens_per_second(o: Outcome) -> float | None:
    tps = [e["data"]["tokens_per_second"] for e in o.events
           if e.get("type") == "metrics" and "tokens_per_second" in (e.get("data") or {})]
    return sum(tps) / len(tps) if tps else None


def eta_errors(o: Outcome) -> dict[str, float | None]:
    """|estimated_finish - finished_at| seen at 25 / 50 / 75 % of the run, as a share of what was left."""
    started, finished = o.job.get("started_at") or o.job["created_at"], o.job["finished_at"]
    out: dict[str, float | None] = {}
    for q in (0.25, 0.5, 0.75):
        at = started + q * (finished - started)
        seen = [p for p in o.polls if p[0] >= at and p[1] is not None and p[2] == "running"]
        if not seen:
            out[f"{int(q * 100)}%"] = None
            continue
        now, eta, _ = seen[0]
        left = max(1.0, finished - now)
        out[f"{int(q * 100)}%"] = round((eta - finished) / left, 2)
    return out


# --- report ---------------------------------------------------------------------------------------

def report(results: list[Outcome]) -> None:
    print("\nestimate / actual (goal 0.70-1.30)")
    print(f"{'example':14}{'estimate s':>11}{'created->fin':>13}{'ratio':>7}{'run est':>9}"
          f"{'started->fin':>13}{'ratio':>7}")
    for o in results:
        e = o.estimate
        est, queue = float(e["estimated_seconds"]), float(e.get("queue_seconds") or 0.0)
        print(f"{o.name:14}{est:11.1f}{o.total:13.0f}{est / max(o.total, 1):7.2f}{est - queue:9.1f}"
              f"{o.run:13.0f}{(est - queue) / max(o.run, 1):7.2f}")
    print("\nphases, estimated (breakdown) | measured from events, seconds")
    for o in results:
        b = o.estimate.get("breakdown") or {}
        m = phases(o)
        print(f"  {o.name}: " + json.dumps({k: round(float(v), 1) for k, v in b.items()}))
        print(f"  {' ' * len(o.name)}  " + json.dumps(m) + f"  train tokens/s {train_tokens_per_second(o)}")
    print("\nlive estimated_finish error / time left (0 = exact; + = late), at 25/50/75 % of the run")
    for o in results:
        print(f"  {o.name}: {eta_errors(o)}")
    print("\nquality (the job's evaluation report, fine-tuned vs base)")
    for o in results:
        metrics = (o.job.get("evaluation") or {}).get("metrics") or {}
        keys = ("accuracy", "macro_f1", "valid_loss", "format_match", "exact_match", "preference_accuracy")
        shown = {side: {k: round(v, 3) for k, v in (metrics.get(side) or {}).items() if k in keys}
                 for side in ("base", "fine_tuned")}
        print(f"  {o.name}: {shown}")


def measured_rates(results: list[Outcome]) -> dict[str, Any]:
    """Per model (and training type): what the estimate's table holds, as measured here."""
    rates: dict[str, Any] = {}
    for o in results:
        m, e = phases(o), o.estimate
        kind = e["training_type"]
        row = rates.setdefault(e["model"], {"train_tokens_per_second": {}})
        tps = train_tokens_per_second(o)
        if tps:
            row["train_tokens_per_second"][kind] = round(tps, 1)
        row["setup_seconds"] = m["setup"]
        evals = (e.get("counts") or {}).get("evaluations") or 0
        if evals and e.get("validation_tokens"):
            row["eval_tokens_per_second"] = round(e["validation_tokens"] * evals / max(m["evaluations"], 1.0), 1)
        row["measured_tail_seconds"] = m["tail"]
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", default="quickstart,tiny-lm,smollm2-json,sentiment",
                    help=f"comma-separated, of {', '.join(EXAMPLES)}")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="TUNEHOUSE_TORCH_THREADS for the worker")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    ap.add_argument("--write", type=Path, default=None, help="write measured rates (JSON) here")
    args = ap.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tunehouse-estimate-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(data_dir, port, args.threads)
    results: list[Outcome] = []
    try:
        key = wait_ready(base, proc, data_dir)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=900) as client:
            for name in args.examples.split(","):
                o = run_example(client, EXAMPLES[name], args.timeout)
                results.append(o)
                print(f"{name}: estimate {o.estimate['estimated_seconds']:.0f} s ({o.estimate['basis']}, load "
                      f"average {os.getloadavg()[0]:.1f} at the end, load factor "
                      f"{(o.estimate.get('counts') or {}).get('load_factor')}), created->finished {o.total:.0f} s, "
                      f"started->finished {o.run:.0f} s, seen ending {o.wall:.0f} s after the create request",
                      flush=True)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    report(results)
    if args.write:
        args.write.write_text(json.dumps(measured_rates(results), indent=1) + "\n")
        print(f"\nmeasured rates written to {args.write}")


if __name__ == "__main__":
    main()
