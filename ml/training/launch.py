"""One process of a training group: `torchrun --standalone --nproc_per_node N -m ml.training.launch SPEC`.

SPEC is a JSON file written by the job runner (`LaunchSpec`). Every rank rebuilds the recipe from it;
rank 0 alone talks to the runner, through two local files: it appends its hook calls as JSON lines to
`events` (message, metrics, progress, checkpoint, then one `outcome` or `error` line: `internal` when
the failure is not the user's) and reads
`control`, where the runner writes an interrupt (cancelled / paused / lease_lost) for the group to
stop on. The runner keeps the lease and the database; no rank touches either.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import BaseModel

from ml.checkpoint import CheckpointInfo
from ml.config import EventLevel, Interrupt, RecipeConfig
from ml.errors import InputError
from ml.models.base import BaseModelSpec, LocalBase

if TYPE_CHECKING:
    from ml.training.recipe import TrainingRecipe

FINAL_DIR = "final"  # under the workdir: the consolidated weights of a completed run
PEER_GRACE_S = 30.0  # how long a failed rank waits for rank 0 to report before it exits


class LaunchSpec(BaseModel):
    config: RecipeConfig
    base: BaseModelSpec
    base_path: str
    workdir: str
    train_path: str
    valid_path: str | None = None
    resume_dir: str | None = None
    init_dir: str | None = None
    device: str = "auto"
    threads: int = 1
    events: str
    control: str
    validation_file: str | None = None  # the job's validation file id, for the evaluation report
    report: bool = True


class ChannelHooks:
    """Rank 0's hooks: one JSON line per call, flushed, so the runner sees them as they happen."""

    def __init__(self, events: Path, control: Path) -> None:
        self.events, self.control = events, control
        self._stop: Interrupt | None = None

    def send(self, kind: str, **data: Any) -> None:
        with self.events.open("a") as fh:
            fh.write(json.dumps({"kind": kind, **data}, default=str) + "\n")

    def message(self, text: str, level: EventLevel = "info", data: dict[str, Any] | None = None) -> None:
        self.send("message", text=text, level=level, data=data)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.send("metrics", step=step, values=values)

    def progress(self, step: int, total_steps: int, epoch: float, trained_tokens: int) -> None:
        self.send("progress", step=step, total_steps=total_steps, epoch=epoch, trained_tokens=trained_tokens)

    def interrupted(self) -> Interrupt | None:
        if self._stop is None and self.control.exists():
            text = self.control.read_text().strip()
            self._stop = Interrupt(text) if text in Interrupt.__members__ else None
        return self._stop

    def checkpoint(self, local_dir: Path, info: CheckpointInfo) -> None:
        self.send("checkpoint", dir=str(local_dir), step=info.step)


class QuietHooks:
    """The other ranks: they report nothing (rank 0 decides interrupts for the group)."""

    def message(self, text: str, level: EventLevel = "info", data: dict[str, Any] | None = None) -> None:
        return None

    def metrics(self, step: int, values: dict[str, float]) -> None:
        return None

    def progress(self, step: int, total_steps: int, epoch: float, trained_tokens: int) -> None:
        return None

    def interrupted(self) -> Interrupt | None:
        return None

    def checkpoint(self, local_dir: Path, info: CheckpointInfo) -> None:
        return None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _init_group(spec: LaunchSpec) -> str:
    """Joins the group torchrun set up (env://); returns this rank's device."""
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and spec.device != "cpu"
    wanted, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if use_cuda and wanted > gpus:
        raise InputError(f"resources.devices={wanted}, but this worker has {gpus} GPU(s)",
                         param="resources.devices", code="unsupported_resources")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # One hour: the other ranks wait at the final barrier while rank 0 saves and writes the evaluation
    # report alone (NCCL's default is 10 minutes).
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=1))
    return f"cuda:{local_rank}" if use_cuda else "cpu"


def _load_whole(recipe: TrainingRecipe, weights: Path) -> None:
    """Rank 0 swaps its shard of an FSDP model for a plain copy of the consolidated final weights, so
    the evaluation report (generation, scoring) needs no collective while the other ranks wait."""
    import torch

    from ml.modeling import load_task_model

    model: torch.nn.Module = load_task_model(recipe.task, weights, recipe.tokenizer, recipe.label_names)
    recipe.model = model.to(recipe.device)


def run(spec: LaunchSpec) -> int:
    import torch.distributed as dist

    from ml.runtime import configure_threads
    from ml.training import build_recipe

    configure_threads(spec.threads)
    channel = ChannelHooks(Path(spec.events), Path(spec.control))
    try:
        device = _init_group(spec)
    except InputError as exc:  # before any collective: every rank finds it, rank 0 reports it
        if os.environ.get("RANK", "0") == "0":
            channel.send("error", message=str(exc), code=exc.code, param=exc.param)
        return 3
    main = dist.get_rank() == 0
    hooks: ChannelHooks | QuietHooks = channel if main else QuietHooks()
    workdir = Path(spec.workdir)
    recipe = build_recipe(
        spec.config, hooks, workdir=workdir, train_path=Path(spec.train_path), valid_path=_path(spec.valid_path),
        resume_dir=_path(spec.resume_dir), init_dir=_path(spec.init_dir),
        base=LocalBase(spec.base, Path(spec.base_path)), device=device,
    )
    try:
        recipe.setup()
        outcome = recipe.train()
        if outcome.completed and recipe.world.sharded:  # every rank sends its shards; rank 0 writes
            recipe.save_checkpoint(workdir / FINAL_DIR, with_state=False)
        if main:
            report = None
            if outcome.completed:
                if not recipe.world.sharded:
                    recipe.save_checkpoint(workdir / FINAL_DIR, with_state=False)
                if spec.report:
                    from ml.evaluation import safe_report

                    if recipe.world.sharded:  # the report runs on rank 0 alone: on the exported weights
                        _load_whole(recipe, workdir / FINAL_DIR)
                    report = safe_report(recipe, spec.validation_file, hooks)
            outcome_data = asdict(outcome) | {"interrupt": outcome.interrupt.value if outcome.interrupt else None}
            channel.send("outcome", outcome=outcome_data, report=report)
        # Every rank waits for rank 0's final save and report, so no rank tears gloo down while a peer
        # still talks to it (a rank exiting early aborted with "terminate called without an active
        # exception" on a loaded machine).
        dist.barrier()
        return 0
    except InputError as exc:  # the user's to fix: the runner fails the job with it
        if main:
            channel.send("error", message=str(exc), code=exc.code, param=exc.param)
        return 3
    except Exception as exc:  # ours (or a peer's death seen from here): the runner retries the attempt
        if main:
            channel.send("error", message=f"{type(exc).__name__}: {exc}"[:2000], code="internal_error",
                         param=None, internal=True)
        raise
    finally:
        recipe.cleanup()
        dist.destroy_process_group()


def _await_last_line(events: Path, deadline_s: float = PEER_GRACE_S) -> None:
    """Waits (bounded) until rank 0 has written its error or outcome line. A rank that fails exits at
    once otherwise, and torchrun then stops rank 0 before it reports the same error: a user's mistake
    would come back as a crash and be retried."""
    end, offset, tail = time.monotonic() + deadline_s, 0, b""
    while time.monotonic() < end:
        if events.exists():
            with events.open("rb") as fh:
                fh.seek(offset)
                tail += fh.read()
                offset = fh.tell()
            *complete, tail = tail.split(b"\n")
            if any(json.loads(line).get("kind") in ("error", "outcome") for line in complete if line):
                return
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ml.training.launch SPEC.json", file=sys.stderr)
        return 2
    spec = LaunchSpec.model_validate_json(Path(args[0]).read_text())
    try:
        rc = run(spec)
    except Exception:  # the traceback is the group log's record of what went wrong
        traceback.print_exc()
        rc = 1
    # Rank 0's node only: a gang follower's ranks have no channel to wait on.
    if rc and os.environ.get("RANK", "0") != "0" and os.environ.get("GROUP_RANK", "0") == "0":
        _await_last_line(Path(spec.events))
    return rc


def _exit_now(code: int) -> NoReturn:
    """Ends the rank without interpreter finalization. Objects that outlive `destroy_process_group` (a
    DTensor's device mesh, gloo work) are otherwise torn down with the interpreter, where a gloo thread
    still joinable aborts the rank ("terminate called without an active exception", SIGABRT) after a
    clean run; torchrun then reports the group failed. Every file this rank wrote is already closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
