"""User commands of the `tunehouse` CLI: files, jobs (create, follow with a live progress bar,
plot), models, predict and chat, all over the HTTP API. The server is `--base-url` (or
TUNEHOUSE_BASE_URL, then OPENAI_BASE_URL; a trailing /v1 is fine) and the key `--api-key` (or
TUNEHOUSE_API_KEY, then OPENAI_API_KEY, then the key `tunehouse serve` saved in the data dir)."""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from app.jobs.events import metric_curve
from app.jobs.state import TERMINAL, JobStatus

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
# --follow reconnects (an API restart, a dropped proxy connection) with backoff up to this delay, for as
# long as the server stays unreachable up to --max-wait.
RECONNECT_BASE_DELAY = 0.5
RECONNECT_MAX_DELAY = 15.0
FOLLOW_MAX_WAIT = 3600.0
_sleep = time.sleep  # backoff pause (tests count the reconnect attempts through it)
ID_COLUMNS = frozenset({"id", "fine_tuned_model", "fine_tuned_model_checkpoint", "base_model"})
Series = list[tuple[int, float]]
NOT_EVAL_KEYS = ("step", "attempt")  # an evaluation's metrics event carries valid_loss and these

BaseUrl = Annotated[str, typer.Option(
    "--base-url", envvar=["TUNEHOUSE_BASE_URL", "OPENAI_BASE_URL"], help="tunehouse server URL")]
ApiKey = Annotated[str, typer.Option(
    "--api-key", envvar=["TUNEHOUSE_API_KEY", "OPENAI_API_KEY"], show_default=False,
    help="API key (default: the key `tunehouse serve` saved in the data dir)")]
JsonOut = Annotated[bool, typer.Option("--json", help="print the raw JSON response")]

files_app = typer.Typer(help="Upload and list training files", no_args_is_help=True)
jobs_app = typer.Typer(help="Create, watch and manage fine-tuning jobs", no_args_is_help=True)
models_app = typer.Typer(help="Base and fine-tuned models", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Mount the user commands on the `tunehouse` app (idempotent)."""
    if any(g.name == "files" for g in app.registered_groups):
        return
    app.add_typer(files_app, name="files")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(models_app, name="models")
    app.command("predict")(predict)
    app.command("chat")(chat)


# --- HTTP client ------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.details = status, message, code, details or []

    @classmethod
    def of(cls, r: httpx.Response) -> ApiError:
        try:
            err = r.json().get("error") or {}
        except (ValueError, AttributeError):
            err = {}
        message = err.get("message") or r.text.strip()[:500] or r.reason_phrase
        return cls(r.status_code, message, err.get("code"), err.get("details"))


@dataclass
class SseEvent:
    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Server-sent events from a stream of lines (comments and keep-alives skipped)."""
    event, last_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield SseEvent(event, "\n".join(data), last_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value


def _root_url(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def _saved_key() -> str:
    from app.settings import get_settings

    path = get_settings().data_dir / "api_key"
    return path.read_text().strip() if path.is_file() else ""


class Api:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.root = _root_url(base_url)
        key = api_key or _saved_key()
        self.http = httpx.Client(base_url=self.root + "/v1", timeout=httpx.Timeout(60.0, connect=5.0),
                                 headers={"Authorization": f"Bearer {key}"} if key else {})

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.is_error:
            raise ApiError.of(r)
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None, **kw: Any) -> Any:
        return self.request("POST", path, json=body, **kw)

    def stream(self, path: str, body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> Iterator[SseEvent]:
        method, kw = ("POST", {"json": body}) if body is not None else ("GET", {"params": {"stream": "true"}})
        timeout = httpx.Timeout(10.0, read=90.0)  # the server sends a keep-alive every 15 s
        with self.http.stream(method, path, headers={"Accept": "text/event-stream", **(headers or {})},
                              timeout=timeout, **kw) as r:
            if r.is_error:
                r.read()
                raise ApiError.of(r)
            yield from parse_sse(r.iter_lines())

    def list_all(self, path: str, page_size: int = 100) -> list[dict[str, Any]]:
        """Every item of a paginated list (newest first), following `after` cursors."""
        items: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.get(path, limit=page_size, after=after)
            items += page["data"]
            if not page.get("has_more") or not page["data"]:
                return items
            after = page["data"][-1]["id"]


# --- output helpers ---------------------------------------------------------------------------

P = ParamSpec("P")
R = TypeVar("R")


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _print_api_error(e: ApiError) -> None:
    con = _err()
    code = f" [red]({e.code})[/]" if e.code else ""
    con.print(f"[bold red]Error {e.status}[/]{code}: {e.message}")
    if e.details:
        table = Table("line", "field", "problem", box=None, pad_edge=False)
        for d in e.details:
            table.add_row(str(d.get("line") or ""), str(d.get("field") or ""), str(d.get("message") or ""))
        con.print(table)


def api_command(fn: Callable[P, R]) -> Callable[P, R]:
    """API errors become a red message and exit code 1; an unreachable server exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ApiError as e:
            _print_api_error(e)
            raise typer.Exit(1) from None
        except httpx.TransportError as e:
            url = kwargs.get("base_url", DEFAULT_BASE_URL)
            _err().print(f"[bold red]Cannot reach the tunehouse server at {url}[/]: {type(e).__name__}: {e}\n"
                         "Set --base-url or TUNEHOUSE_BASE_URL.")
            raise typer.Exit(2) from None

    return wrapper


def _time(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _table(*columns: str) -> Table:
    """Ids never wrap (they must stay copyable); other columns fold when the terminal is narrow."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c, overflow="fold", no_wrap=c in ID_COLUMNS)
    return table


def _print_listing(columns: tuple[str, ...], rows: list[list[str]]) -> None:
    """A table on a terminal; piped (not a tty), one tab-separated line per item, id first and never
    wrapped, no header: `tunehouse models list | cut -f1`."""
    con = _out()
    if not con.is_terminal:
        for row in rows:
            typer.echo("\t".join(Text.from_markup(cell).plain for cell in row))
        return
    table = _table(*columns)
    for row in rows:
        table.add_row(*row)
    con.print(table)


def sparkline(values: list[float], width: int = 60) -> str:
    """Unicode sparkline of `values`, averaged down to at most `width` characters."""
    if not values:
        return ""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n:(i + 1) * len(values) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    return "".join(SPARK_BLOCKS[round((v - lo) / span * (len(SPARK_BLOCKS) - 1))] for v in means)


def _loss_summary(losses: list[float]) -> str:
    if not losses:
        return "no loss values yet"
    return f"loss {sparkline(losses)}  {losses[0]:.4g} → {losses[-1]:.4g} (min {min(losses):.4g})"


# --- files ------------------------------------------------------------------------------------

def upload_file(api: Api, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
    with path.open("rb") as fh:
        return api.request("POST", "/files", data={"purpose": purpose},  # type: ignore[no-any-return]
                           files={"file": (path.name, fh, "application/octet-stream")},
                           timeout=httpx.Timeout(None, connect=5.0))


@files_app.command("upload")
@api_command
def files_upload(path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
                 purpose: str = "fine-tune",
                 quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the file id")] = False,
                 base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """Upload a JSONL or CSV training file; it is validated line by line."""
    with Api(base_url, api_key) as api:
        f = upload_file(api, path, purpose)
    if quiet:
        typer.echo(f["id"])
        return
    _out().print(f"[green]Uploaded[/] {f['filename']}: [bold]{f['id']}[/]  rows={f.get('rows')}  "
                 f"format={f.get('format')}  bytes={f['bytes']}")


@files_app.command("list")
@api_command
def files_list(purpose: str | None = None, limit: int = 100, base_url: BaseUrl = DEFAULT_BASE_URL,
               api_key: ApiKey = "") -> None:
    """List uploaded files, newest first."""
    with Api(base_url, api_key) as api:
        page = api.get("/files", purpose=purpose, limit=limit)
    _print_listing(("id", "filename", "purpose", "format", "rows", "bytes", "created"),
                   [[f["id"], f["filename"], f["purpose"], f.get("format") or "", str(f.get("rows", "")),
                     str(f["bytes"]), _time(f["created_at"])] for f in page["data"]])


@files_app.command("delete")
@api_command
def files_delete(file_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """Delete an uploaded file (refused while a job still needs it)."""
    with Api(base_url, api_key) as api:
        res = api.request("DELETE", f"/files/{file_id}")
    _out().print(f"Deleted {res['id']}")


@files_app.command("clean")
@api_command
def files_clean(
    file_id: str,
    dedupe: Annotated[bool, typer.Option(help="drop exact duplicates")] = False,
    near_dedupe: Annotated[bool, typer.Option(help="drop near duplicates (same label)")] = False,
    drop_empty: Annotated[bool, typer.Option(help="drop examples with nothing to learn from")] = True,
    max_chars: Annotated[int | None, typer.Option(help="drop examples longer than this (characters)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="drop examples longer than this (needs --model)")] = None,
    model: Annotated[str | None, typer.Option(help="base model whose tokenizer counts --max-tokens")] = None,
    scrub_pii: Annotated[bool, typer.Option(help="replace e-mails, phone numbers, IBANs... with tags")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the new file id")] = False,
    base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "",
) -> None:
    """Write a cleaned, validated copy of a training file (a new file id; the original is kept)."""
    body = _drop_none({"dedupe": dedupe, "near_dedupe": near_dedupe, "drop_empty": drop_empty,
                       "max_chars": max_chars, "max_tokens": max_tokens, "model": model, "scrub_pii": scrub_pii})
    with Api(base_url, api_key) as api:
        f = api.post(f"/files/{file_id}/clean", body)
    if quiet:
        typer.echo(f["id"])
        return
    _out().print(f"[green]Cleaned[/] {file_id} → [bold]{f['id']}[/]: "
                 + _cleaning_text((f.get("stats") or {}).get("cleaning") or {}))


def _cleaning_text(report: dict[str, Any]) -> str:
    """'10 of 12 rows kept (removed: 2 duplicate)' from the file's `stats.cleaning`."""
    def counts(key: str) -> str:
        items = (report.get(key) or {}).items()
        return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in items if v)
    text = f"{report.get('output_rows', '?')} of {report.get('input_rows', '?')} rows kept " \
           f"(removed: {counts('removed') or 'none'})"
    return text + (f"; scrubbed {counts('scrubbed')}" if counts("scrubbed") else "")


# --- jobs -------------------------------------------------------------------------------------

def _file_ref(api: Api, value: str) -> str:
    """A file id, or a local path that is uploaded first."""
    path = Path(value)
    if not path.is_file():
        return value
    f = upload_file(api, path)
    # A status note, on stderr: stdout stays the command's result (`jobs create -q` prints only the id).
    _err().print(f"[green]Uploaded[/] {path} → {f['id']} ({f.get('rows')} rows, {f.get('format')})")
    return str(f["id"])


def _training_type(kind: str | None, lora_r: int | None, lora_alpha: int | None) -> Any:
    if lora_r is None and lora_alpha is None:
        return kind
    extra = {"lora_r": lora_r, "lora_alpha": lora_alpha}
    return {"type": kind or "lora", **{k: v for k, v in extra.items() if v is not None}}


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise typer.BadParameter(f"expected KEY=VALUE, got {bad[0]!r}", param_hint="--metadata")
    return dict(p.split("=", 1) for p in pairs)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _method_body(method: str | None, beta: float | None, hp: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method` (hyperparameters inside it) when asked for, else the top-level shorthand."""
    if beta is not None and method not in (None, "dpo"):
        raise typer.BadParameter("--beta applies to --method dpo", param_hint="--beta")
    kind = "dpo" if beta is not None else method
    if kind is None:
        return {"hyperparameters": hp or None}
    settings = hp | ({"beta": beta} if beta is not None else {})
    return {"method": {"type": kind, kind: {"hyperparameters": settings}}}


@jobs_app.command("create")
@api_command
def jobs_create(
    model: Annotated[str, typer.Option(help="base model (see `tunehouse models list`) or ft: model")],
    training_file: Annotated[str, typer.Option(help="file id, or a local path to upload first")],
    validation_file: Annotated[str | None, typer.Option(help="file id or local path")] = None,
    task: Annotated[str | None, typer.Option(help="causal_lm|classification|regression|masked_lm")] = None,
    training_type: Annotated[str | None, typer.Option(help="lora | full | freeze | prompt_tuning")] = None,
    suffix: str | None = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs (default: auto)")] = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    learning_rate_multiplier: float | None = None,
    lora_r: int | None = None,
    lora_alpha: int | None = None,
    max_seq_length: int | None = None,
    seed: int | None = None,
    webhook_url: str | None = None,
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable")] = None,
    idempotency_key: str | None = None,
    method: Annotated[str | None, typer.Option(help="supervised | dpo (preference pairs)")] = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (default 0.1); implies --method dpo")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="watch the job until it ends")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the job id")] = False,
    base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "",
) -> None:
    """Create a fine-tuning job (local training/validation files are uploaded first)."""
    hp = _drop_none({"n_epochs": epochs, "batch_size": batch_size,
                     "learning_rate_multiplier": learning_rate_multiplier})
    with Api(base_url, api_key) as api:
        body = _drop_none({
            **_training_body(api, model, training_file, validation_file, task,
                             _training_type(training_type, lora_r, lora_alpha)),
            "suffix": suffix, **_method_body(method, beta, hp), "learning_rate": learning_rate,
            "max_seq_length": max_seq_length, "seed": seed, "webhook_url": webhook_url,
            "metadata": _metadata(metadata),
        })
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        job = api.post("/fine_tuning/jobs", body, headers=headers)
        if quiet:
            typer.echo(job["id"])
        else:
            _out().print(f"[green]Created[/] job [bold]{job['id']}[/] ({job['model']}, {job['task']}, "
                         f"{job['training_type'].get('type')}): {job['status']}")
        if follow:
            _finish(Follower(api, job["id"], _out()).run())


def _training_body(api: Api, model: str, training_file: str, validation_file: str | None, task: str | None,
                   training_type: Any) -> dict[str, Any]:
    return {"model": model, "training_file": _file_ref(api, training_file),
            "validation_file": _file_ref(api, validation_file) if validation_file else None,
            "task": task, "training_type": training_type}


@jobs_app.command("estimate")
@api_command
def jobs_estimate(
    model: Annotated[str, typer.Option(help="base model (see `tunehouse models list`)")],
    training_file: Annotated[str, typer.Option(help="file id, or a local path to upload first")],
    validation_file: Annotated[str | None, typer.Option(help="file id or local path")] = None,
    task: Annotated[str | None, typer.Option(help="causal_lm|classification|regression|masked_lm")] = None,
    training_type: Annotated[str | None, typer.Option(help="lora | full | freeze | prompt_tuning")] = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs (default: auto)")] = None,
    batch_size: int | None = None,
    lora_r: int | None = None,
    lora_alpha: int | None = None,
    max_seq_length: int | None = None,
    method: Annotated[str | None, typer.Option(help="supervised | dpo (preference pairs)")] = None,
    as_json: JsonOut = False,
    base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "",
) -> None:
    """Tokens, steps, duration and peak memory of a job, without creating it (validated like `create`)."""
    hp = _drop_none({"n_epochs": epochs, "batch_size": batch_size})
    with Api(base_url, api_key) as api:
        body = _drop_none({
            **_training_body(api, model, training_file, validation_file, task,
                             _training_type(training_type, lora_r, lora_alpha)),
            **_method_body(method, None, hp), "max_seq_length": max_seq_length,
        })
        est = api.post("/fine_tuning/estimate", body)
    if as_json:
        typer.echo(json.dumps(est, indent=2))
        return
    _out().print(_estimate_table(est))


def _estimate_table(est: dict[str, Any]) -> Table:
    mem = est.get("memory") or {}
    fits = "" if mem.get("fits") is None else "[green]fits[/]" if mem["fits"] else "[red]does not fit[/]"
    device = f" of {_gib(mem['device_bytes'])}" if mem.get("device_bytes") else ""
    rows = {
        "model": f"{est['model']} ({est['task']}, {est['training_type']})",
        "examples": f"{est['examples']} train, {est['validation_examples']} validation"
                    + (" (scaled from a sample)" if est.get("sampled") else ""),
        "tokens": f"{est['train_tokens']:,} per epoch x {est['n_epochs']} epochs = {est['trained_tokens']:,}",
        "steps": f"{est['steps']} (batch size {est['batch_size']})",
        "duration": f"{_duration(est['estimated_seconds'])} at {est['tokens_per_second']:,.0f} tokens/s "
                    f"({est['basis']})",
        "phases": ", ".join(f"{k} {v:.0f}s" for k, v in (est.get("breakdown") or {}).items()
                            if k not in ("run", "total") and v >= 0.5),
        "peak memory": f"{_gib(mem['peak_bytes'])}{device} {fits}".strip() if mem else "",
    }
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in rows.items():
        if v:
            table.add_row(k, v)
    return table


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@jobs_app.command("list")
@api_command
def jobs_list(limit: int = 20, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """List fine-tuning jobs, newest first."""
    with Api(base_url, api_key) as api:
        page = api.get("/fine_tuning/jobs", limit=limit)
    _print_listing(("id", "model", "task", "status", "progress", "fine_tuned_model", "created"),
                   [[j["id"], j["model"], j["task"], _status(j["status"]), _progress_text(j),
                     j.get("fine_tuned_model") or "", _time(j["created_at"])] for j in page["data"]])


def _status(status: str) -> str:
    colors: dict[str, str] = {JobStatus.succeeded: "green", JobStatus.failed: "red",
                              JobStatus.cancelled: "yellow", JobStatus.running: "cyan"}
    color = colors.get(status)
    return f"[{color}]{status}[/]" if color else status


def _progress_text(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    if not p.get("total_steps"):
        return ""
    return f"{p.get('step', 0)}/{p['total_steps']}"


@jobs_app.command("get")
@api_command
def jobs_get(job_id: str, as_json: JsonOut = False, base_url: BaseUrl = DEFAULT_BASE_URL,
             api_key: ApiKey = "") -> None:
    """Show one job."""
    with Api(base_url, api_key) as api:
        job = api.get(f"/fine_tuning/jobs/{job_id}")
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    _out().print(_job_table(job))


def _evaluation_text(report: dict[str, Any] | None) -> str:
    """'accuracy 0.50 -> 0.97, macro_f1 0.33 -> 0.97' from the base vs fine-tuned report."""
    metrics = (report or {}).get("metrics") or {}
    base, tuned = metrics.get("base") or {}, metrics.get("fine_tuned") or {}
    return ", ".join(f"{k} {base[k]:.4g} -> {tuned[k]:.4g}" for k in tuned
                     if isinstance(tuned.get(k), int | float) and isinstance(base.get(k), int | float))


def _progress_line(job: dict[str, Any]) -> str:
    """'12/40 epoch 0.9 ETA 3m10s'; no ETA once the job has ended (or before it runs)."""
    p = job.get("progress") or {}
    eta = f" ETA {_duration(p.get('eta_seconds'))}" if job["status"] == JobStatus.running else ""
    return f"{_progress_text(job)} epoch {p.get('epoch')}{eta}"


def _job_table(job: dict[str, Any]) -> Table:
    p = job.get("progress") or {}
    rows = {
        "id": job["id"], "status": _status(job["status"]), "model": job["model"], "task": job["task"],
        "training_type": (job.get("training_type") or {}).get("type", ""),
        "hyperparameters": json.dumps(job.get("hyperparameters")), "training_file": job["training_file"],
        "validation_file": job.get("validation_file") or "", "queue_position": job.get("queue_position"),
        "progress": _progress_line(job) if p.get("total_steps") else "",
        "attempt": f"{job.get('attempt')}/{job.get('max_attempts')}",
        "trained_tokens": job.get("trained_tokens"),
        "fine_tuned_model": job.get("fine_tuned_model"), "created": _time(job["created_at"]),
        "finished": _time(job.get("finished_at")), "error": (job.get("error") or {}).get("message"),
        "evaluation": _evaluation_text(job.get("evaluation")),
    }
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in rows.items():
        if v not in (None, ""):
            table.add_row(k, str(v))
    return table


@jobs_app.command("cancel")
@api_command
def jobs_cancel(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """Cancel a job (its checkpoints are kept)."""
    with Api(base_url, api_key) as api:
        job = api.post(f"/fine_tuning/jobs/{job_id}/cancel")
    _out().print(f"{job['id']}: {_status(job['status'])}")


@jobs_app.command("pause")
@api_command
def jobs_pause(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """Pause a job: a queued one at once, a running one at its next checkpoint (resume it later)."""
    with Api(base_url, api_key) as api:
        job = api.post(f"/fine_tuning/jobs/{job_id}/pause")
    note = " (pause requested: the worker saves a checkpoint and stops)" if job["status"] == JobStatus.running else ""
    _out().print(f"{job['id']}: {_status(job['status'])}{note}")


@jobs_app.command("resume")
@api_command
def jobs_resume(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """Queue a paused job again; it continues from its last checkpoint."""
    with Api(base_url, api_key) as api:
        job = api.post(f"/fine_tuning/jobs/{job_id}/resume")
    _out().print(f"{job['id']}: {_status(job['status'])}")


@jobs_app.command("events")
@api_command
def jobs_events(job_id: str, limit: int = 50, base_url: BaseUrl = DEFAULT_BASE_URL,
                api_key: ApiKey = "") -> None:
    """The job's latest events, oldest first."""
    with Api(base_url, api_key) as api:
        page = api.get(f"/fine_tuning/jobs/{job_id}/events", limit=limit)
    table = _table("time", "level", "message")
    for e in reversed(page["data"]):
        table.add_row(_time(e["created_at"]), _level(e["level"]), e["message"])
    _out().print(table)


def _level(level: str) -> str:
    return {"warn": "[yellow]warn[/]", "error": "[red]error[/]"}.get(level, level)


@jobs_app.command("checkpoints")
@api_command
def jobs_checkpoints(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """The job's checkpoints (usable as models and as `from_checkpoint`)."""
    with Api(base_url, api_key) as api:
        rows = api.list_all(f"/fine_tuning/jobs/{job_id}/checkpoints")
    table = _table("step", "epoch", "train_loss", "valid_loss", "best", "id", "fine_tuned_model_checkpoint")
    for c in sorted(rows, key=lambda c: c["step_number"]):
        m = c.get("metrics") or {}
        table.add_row(str(c["step_number"]), f"{c.get('epoch', 0):.2f}", _num(m.get("train_loss")),
                      _num(m.get("valid_loss")), "★" if c.get("is_best") else "", c["id"],
                      c["fine_tuned_model_checkpoint"])
    _out().print(table)


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, int | float) else ""


def _attachment_name(r: httpx.Response) -> str:
    match = re.search(r'filename="([^"]+)"', r.headers.get("content-disposition", ""))
    return Path(match.group(1)).name if match else "weights.tar"


def _save_tar(r: httpx.Response, dest: Path | None) -> Path:
    """Streams the body to `dest` (a file or a directory) via a .part file, so no half tar is left."""
    out = dest or Path(_attachment_name(r))
    if out.is_dir():
        out = out / _attachment_name(r)
    part = out.with_name(out.name + ".part")
    with open(part, "wb") as fh:
        for chunk in r.iter_bytes(1 << 20):
            fh.write(chunk)
    part.replace(out)
    return out


def download_weights(api: Api, job_id: str, checkpoint: str, fmt: str | None, dest: Path | None,
                     timeout: float, on_wait: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The weights tar, saved. A 202 (a worker is building the merged model) is polled after its
    Retry-After until the tar comes, for at most `timeout` seconds."""
    path = f"/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint}/download"
    params = {"format": fmt} if fmt else {}
    deadline = time.monotonic() + timeout
    while True:
        with api.http.stream("GET", path, params=params) as r:
            if r.is_error:
                r.read()
                raise ApiError.of(r)
            if r.status_code != 202:
                return _save_tar(r, dest)
            r.read()
            export, wait = r.json(), float(r.headers.get("retry-after") or 5)
        if on_wait is not None:
            on_wait(export)
        if time.monotonic() + wait > deadline:
            raise ApiError(202, f"Export {export['id']} is still {export['status']} after {timeout:.0f} s; "
                                "run the command again later.", "export_pending")
        time.sleep(wait)


@jobs_app.command("download")
@api_command
def jobs_download(
    job_id: str,
    checkpoint: Annotated[str, typer.Argument(help="a checkpoint id, or final")] = "final",
    fmt: Annotated[str | None, typer.Option("--format", help="adapter | merged | full (default: as trained)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="file or directory to write")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for a merged model to be built")] = 3600.0,
    base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "",
) -> None:
    """Download weights as a tar. A LoRA's merged / full model is built by a worker first: this waits."""
    console = _out()
    shown: set[str] = set()

    def waiting(export: dict[str, Any]) -> None:
        if export["status"] not in shown:
            shown.add(export["status"])
            console.print(f"Export {export['id']} is {export['status']}; waiting for the worker...")

    with Api(base_url, api_key) as api:
        saved = download_weights(api, job_id, checkpoint, fmt, output, timeout, waiting)
    console.print(f"Saved {saved} ({saved.stat().st_size:,} bytes)")


@jobs_app.command("follow")
@api_command
def jobs_follow(
    job_id: str,
    max_wait: Annotated[float, typer.Option(help="seconds to keep reconnecting while the server is unreachable")]
    = FOLLOW_MAX_WAIT,
    base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "",
) -> None:
    """Watch a job live (progress bar with loss and ETA) until it ends, reconnecting across API restarts.
    Exit code 1 unless it succeeded."""
    with Api(base_url, api_key) as api:
        _finish(Follower(api, job_id, _out(), max_wait).run())


def _finish(result: FollowResult) -> None:
    job, con = result.job, _out()
    con.print(f"Job [bold]{job['id']}[/] {_status(job['status'])}")
    if job.get("fine_tuned_model"):
        con.print(f"Fine-tuned model: [bold]{job['fine_tuned_model']}[/]")
    if job.get("error"):
        con.print(f"[red]Error:[/] {job['error'].get('message')}")
    con.print(_loss_summary(result.losses))
    if job["status"] != JobStatus.succeeded:
        raise typer.Exit(1)


@dataclass
class FollowResult:
    job: dict[str, Any]
    losses: list[float] = field(default_factory=list)


class Follower:
    """Reads the job's SSE stream (resuming with Last-Event-ID after a dropped connection) and
    drives a rich progress bar; the job object supplies status, total steps, epoch and ETA.

    A lost stream is retried with backoff until the job ends, or until the server has been unreachable
    for `max_wait` seconds: an API restart or deploy does not end the watch."""

    def __init__(self, api: Api, job_id: str, console: Console, max_wait: float = FOLLOW_MAX_WAIT) -> None:
        self.api, self.job_id, self.console, self.max_wait = api, job_id, console, max_wait
        self.losses: list[float] = []
        self.last_id: str | None = None
        self.last_poll = 0.0
        self.status = ""
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.fields[steps]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("ETA {task.fields[eta]}"), console=console)
        self.task = TaskID(0)

    def run(self) -> FollowResult:
        with self.progress:
            self.task = self.progress.add_task("", total=None, steps="?", loss="-", epoch="-", eta="?")
            self._poll(force=True)
            self._stream()
            self._poll(force=True)
        return FollowResult(self.api.get(f"/fine_tuning/jobs/{self.job_id}"), self.losses)

    def _stream(self) -> None:
        failures, down_since = 0, None
        while True:
            try:
                for ev in self._events():
                    if ev.event == "end":
                        return
                    failures, down_since = 0, None
                    self.last_id = ev.id or self.last_id
                    self._handle(ev.json())
                reason = "closed by the server"
            except httpx.TransportError as e:
                reason = type(e).__name__
            except ApiError as e:
                if e.status < 500:  # 502/503 while a proxy or the API restarts; a 4xx will not heal
                    raise
                reason = f"HTTP {e.status}"
            if failures == 0:
                self.console.print(f"[yellow]event stream interrupted ({reason}); reconnecting[/]")
            if self._reachable():
                down_since = None
                if self.status in TERMINAL:
                    return
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > self.max_wait:
                self.console.print(f"[yellow]gave up: the server was unreachable for {self.max_wait:g} s[/]")
                return
            _sleep(min(RECONNECT_BASE_DELAY * 2 ** min(failures, 10), RECONNECT_MAX_DELAY))
            failures += 1

    def _events(self) -> Iterator[SseEvent]:
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        return self.api.stream(f"/fine_tuning/jobs/{self.job_id}/events", headers=headers)

    def _reachable(self) -> bool:
        """Refresh the job (status, progress); False while the server cannot answer."""
        try:
            self._poll(force=True)
        except httpx.TransportError:
            return False
        except ApiError as e:
            if e.status < 500:
                raise
            return False
        return True

    def _handle(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("type") == "metrics":
            self._metrics(data)
            self._poll()
            return
        level = "" if event["level"] == "info" else _level(event["level"]) + " "
        self.console.print(f"[dim]{_time(event['created_at'])}[/] {level}{event['message']}")
        self._poll(force=True)  # lifecycle events (started, paused, retrying...) change the status label

    def _metrics(self, data: dict[str, Any]) -> None:
        if isinstance(data.get("train_loss"), int | float):
            self.losses.append(float(data["train_loss"]))
            self.progress.update(self.task, loss=f"{data['train_loss']:.4f}")
        if isinstance(data.get("step"), int):
            self.progress.update(self.task, completed=data["step"])
        # an evaluation, not a training step (whose keys vary: DPO stats, per-rank throughput)
        evals = {k: v for k, v in data.items() if k not in NOT_EVAL_KEYS} if "valid_loss" in data else {}
        if evals:
            shown = ", ".join(f"{k}={_num(v) or v}" for k, v in evals.items())
            self.console.print(f"[cyan]eval[/] step {data.get('step')}: {shown}")

    def _poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_poll < 2.0:
            return
        self.last_poll = now
        job = self.api.get(f"/fine_tuning/jobs/{self.job_id}")
        self.status = job["status"]
        p = job.get("progress") or {}
        total = p.get("total_steps")
        queued = job["status"] == JobStatus.queued and job.get("queue_position")
        desc = job["status"] + (f" (#{job['queue_position']})" if queued else "")
        self.progress.update(self.task, description=desc, total=total,
                             steps=f"{p.get('step', 0)}/{total or '?'}",
                             epoch=f"{p['epoch']:.2f}" if isinstance(p.get("epoch"), int | float) else "-",
                             eta=_duration(p.get("eta_seconds")) if job["status"] == JobStatus.running else "-")
        if isinstance(p.get("step"), int):
            self.progress.update(self.task, completed=p["step"])


@jobs_app.command("plot")
@api_command
def jobs_plot(job_id: str, out: Annotated[Path, typer.Option(help="PNG to write")] = Path("loss.png"),
              base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """Plot train/valid loss from the job's metrics events to a PNG (and a sparkline here)."""
    with Api(base_url, api_key) as api:
        events = api.list_all(f"/fine_tuning/jobs/{job_id}/events")
    train, valid = loss_series(events)
    if not train and not valid:
        _err().print(f"[yellow]Job {job_id} has no loss metrics yet.[/]")
        raise typer.Exit(1)
    try:
        plot_losses(job_id, train, valid, out)
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        _err().print("[red]`jobs plot` needs matplotlib:[/] pip install 'tunehouse[cli]'")
        raise typer.Exit(1) from None
    con = _out()
    con.print(f"Wrote {out}")
    con.print(_loss_summary([v for _, v in train]))
    if valid:
        con.print(f"valid {sparkline([v for _, v in valid])}  best {min(v for _, v in valid):.4g}")


def loss_series(events: list[dict[str, Any]]) -> tuple[Series, Series]:
    """(step, train_loss) and (step, valid_loss) pairs from the events (newest first, as listed): one per
    step across attempts, as in the result CSV (steps re-trained after a resume replace abandoned ones)."""
    rows = metric_curve((e.get("type", ""), e.get("data")) for e in reversed(events))

    def series(name: str) -> Series:
        return [(r["step"], float(r[name])) for r in rows if isinstance(r.get(name), int | float)]
    return series("train_loss"), series("valid_loss")


def plot_losses(job_id: str, train: Series, valid: Series, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid, strict=True), label="valid loss", marker="o", linewidth=1.5)
    ax.set(xlabel="step", ylabel="loss", title=job_id)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


# --- models and inference ---------------------------------------------------------------------

@models_app.command("list")
@api_command
def models_list(base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """Base models from the catalog and this project's fine-tuned models."""
    with Api(base_url, api_key) as api:
        page = api.get("/models")
    rows = [[m["id"], m.get("kind", ""), ", ".join(m.get("tasks") or []), m.get("base_model") or "",
             m.get("training_type") or ", ".join(m.get("training_types") or []), _time(m.get("created"))]
            for m in page["data"]]
    _print_listing(("id", "kind", "tasks", "base_model", "training", "created"), rows)


@api_command
def predict(model: str, text: Annotated[list[str], typer.Argument(help="one or more inputs")],
            top_k: Annotated[int | None, typer.Option(help="masked_lm: fills per mask")] = None,
            as_json: JsonOut = False, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """Classify / score / fill-mask texts with a fine-tuned model (POST /v1/predictions)."""
    with Api(base_url, api_key) as api:
        res = api.post("/predictions", _drop_none({"model": model, "input": text, "top_k": top_k}))
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    _out().print(prediction_table(text, res["data"]))


def prediction_table(inputs: list[str], data: list[dict[str, Any]]) -> Table:
    keys = [k for k in ("label", "score", "value", "scores", "fills") if any(k in d for d in data)]
    table = _table("#", "input", *keys)
    for d in data:
        i = int(d.get("index", 0))
        shown = inputs[i] if i < len(inputs) else ""
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        table.add_row(str(i), shown, *(_cell(k, d.get(k)) for k in keys))
    return table


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key == "scores" and isinstance(value, dict):
        top = sorted(value.items(), key=lambda kv: -float(kv[1]))[:3]
        return " ".join(f"{k}={float(v):.3f}" for k, v in top)
    if key == "fills" and isinstance(value, list):
        return " | ".join(", ".join(_fill(c) for c in mask[:3]) if isinstance(mask, list) else str(mask)
                          for mask in value)
    return _num(value) or str(value)


def _fill(candidate: Any) -> str:
    if not isinstance(candidate, dict):
        return str(candidate)
    token = candidate.get("token_str") or candidate.get("token") or candidate.get("text")
    return f"{token} ({float(candidate.get('score', 0)):.2f})"


@api_command
def chat(model: str, message: str,
         system: Annotated[str | None, typer.Option(help="system prompt")] = None,
         max_tokens: int | None = None, temperature: float | None = None,
         stream: Annotated[bool, typer.Option(help="print tokens as they arrive")] = False,
         base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = "") -> None:
    """One chat turn with a causal LM (POST /v1/chat/completions)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": message})
    body = _drop_none({"model": model, "messages": messages, "max_tokens": max_tokens,
                       "temperature": temperature})
    with Api(base_url, api_key) as api:
        if not stream:
            res = api.post("/chat/completions", body)
            typer.echo(res["choices"][0]["message"]["content"])
            return
        for ev in api.stream("/chat/completions", {**body, "stream": True}):
            if ev.data.strip() == "[DONE]":
                break
            delta = (ev.json().get("choices") or [{}])[0].get("delta") or {}
            typer.echo(delta.get("content") or "", nl=False)
        typer.echo()
