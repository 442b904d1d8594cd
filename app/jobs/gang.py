"""Multi-node attempts (`resources.nodes = M > 1`): M workers run one attempt together as a gang.

The worker that claims the job is the leader (node 0). It publishes the rendezvous (its address and a
free port, torchrun's static rendezvous: node 0 hosts the store) as M-1 vacant `gang_seats` rows and
sends M-1 extra claim tokens. A worker holding a token takes a vacant seat before it claims a new job:
a conditional update that gives it that seat's node rank. Once every seat is taken the leader sets
`go`, and every node starts `torchrun --nnodes M --node_rank r` (`app.jobs.distributed`).

The leader alone holds the job's lease and writes its state (rank 0 runs on node 0); followers
heartbeat their seats and stop when the leader's attempt ends. A gang that does not fill within
TUNEHOUSE_GANG_TIMEOUT_SECONDS is dissolved: the job is queued again and the attempt given back, as a
pause does (nothing trained). A node lost mid-run takes the torchrun group down on every node and the
attempt is retried from the last checkpoint, like a lost worker.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, true, update
from sqlalchemy.orm import Session

from app.jobs.events import add_event
from app.jobs.lease import Claim, Heartbeat
from app.jobs.queue import send_run_job
from app.jobs.state import JobStatus, transition
from app.kit.db import session_scope, utcnow
from app.orm import GangSeat, Job
from app.settings import get_settings
from ml.config import Interrupt

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often a waiting leader or follower looks at the seats


@dataclass(frozen=True)
class Rendezvous:
    """What one node passes to torchrun: node 0's store at `endpoint`, this node's rank."""

    endpoint: str
    run_id: str
    nodes: int
    node_rank: int
    devices: int

    @property
    def host(self) -> str:
        return self.endpoint.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices


def advertised_address() -> str:
    """The address other workers reach this one on: the setting, else this host name's address."""
    configured = get_settings().worker_address
    if configured:
        return configured
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def free_port(address: str) -> int:
    """A port free now on `address` (torchrun binds it a moment later; a clash fails the launch, which is
    retried like any lost group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:  # an address this host does not own (NAT, a service name): any interface
            sock.bind(("", 0))
        return int(sock.getsockname()[1])


# --- the leader ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gang:
    claim: Claim
    rendezvous: Rendezvous  # node 0's


def open_gang(got: Claim, nodes: int, devices: int, resume_key: str | None) -> Gang:
    """Publish the rendezvous as M-1 vacant seats, then wake M-1 workers."""
    address = advertised_address()
    endpoint = f"{address}:{free_port(address)}"
    spec = {"nodes": nodes, "devices": devices, "resume_key": resume_key, "leader": got.worker_id}
    with session_scope() as s:
        s.execute(delete(GangSeat).where(GangSeat.job_id == got.job_id))  # an earlier attempt's leftovers
        s.add_all([GangSeat(job_id=got.job_id, attempt=got.attempt, node_rank=r, endpoint=endpoint, spec=spec,
                            go=False) for r in range(1, nodes)])
    for _ in range(nodes - 1):
        send_run_job(got.job_id)
    return Gang(got, Rendezvous(endpoint, run_id(got.job_id, got.attempt), nodes, 0, devices))


def run_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


def _seats(gang: Gang) -> list[ColumnElement[bool]]:
    return [GangSeat.job_id == gang.claim.job_id, GangSeat.attempt == gang.claim.attempt]


Waited = Literal["formed", "timeout", "yield"]


def wait_for_followers(gang: Gang, hb: Heartbeat, timeout_s: float) -> Waited | Interrupt:
    """Until every seat is taken (then `go` is set), the timeout, or an interrupt of the job. "yield":
    nobody joined this gang yet and an older one waits for a worker like this one: two leaders waiting
    for each other would otherwise hold each other's followers until both time out, again and again;
    the oldest gang never yields, so one always forms."""
    deadline = time.monotonic() + timeout_s
    while True:
        if hb.interrupt is not None:
            return hb.interrupt
        with session_scope() as s:
            _free_stale(s, gang)
            taken = _taken(s, gang)
            if taken == gang.rendezvous.nodes - 1:
                s.execute(update(GangSeat).where(*_seats(gang)).values(go=True))
                return "formed"
            if taken == 0 and _older_open_gang(s, gang):
                return "yield"
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(POLL_S)


def _older_open_gang(s: Session, gang: Gang) -> bool:
    mine = select(Job.created_at, Job.id).where(Job.id == gang.claim.job_id).subquery()
    older = or_(Job.created_at < mine.c.created_at, and_(Job.created_at == mine.c.created_at, Job.id < mine.c.id))
    stmt = (select(GangSeat.job_id).join(Job, and_(Job.id == GangSeat.job_id, Job.attempt == GangSeat.attempt))
            .join(mine, true()).where(GangSeat.worker_id.is_(None), GangSeat.go.is_(False),
                                      Job.status == JobStatus.running, Job.devices <= get_settings().worker_devices,
                                      older).limit(1))
    return s.scalar(stmt) is not None


def _taken(s: Session, gang: Gang) -> int:
    return int(s.scalar(select(func.count()).select_from(GangSeat).where(
        *_seats(gang), GangSeat.worker_id.is_not(None))) or 0)


def _stale_before() -> datetime:
    return utcnow() - timedelta(seconds=get_settings().lease_seconds)


def _free_stale(s: Session, gang: Gang) -> None:
    """A follower that joined and then stopped heartbeating (its worker died) gives its seat back."""
    s.execute(update(GangSeat).where(*_seats(gang), GangSeat.worker_id.is_not(None), GangSeat.go.is_(False),
                                     GangSeat.heartbeat_at < _stale_before()).values(worker_id=None, heartbeat_at=None))


def dissolve(gang: Gang, yielded: bool = False) -> str:
    """Not enough workers came (or this leader yields to an older gang): the job goes back to the queue
    with its attempt given back (nothing was trained), keeping its place (ordered by creation)."""
    got = gang.claim
    with session_scope() as s:
        joined = _taken(s, gang) + 1
        close(s, gang)
        if not transition(s, got.job_id, to=JobStatus.queued, from_={JobStatus.running}, owner=got.worker_id,
                          attempt=Job.attempt - 1, enqueued_at=utcnow()):
            return Interrupt.lease_lost.value
        why = ("its worker joins an older job's gang first" if yielded else
               f"only {joined} of {gang.rendezvous.nodes} nodes joined within {get_settings().gang_timeout_seconds:g}s")
        add_event(s, got.job_id, f"Gang dissolved: {why}; re-queued (the attempt is not counted)", level="warn",
                  data={"nodes": gang.rendezvous.nodes, "joined": joined})
    return "yielded" if yielded else "dissolved"


def close(s: Session, gang: Gang) -> None:
    """The attempt's seats go: followers see the attempt ended."""
    s.execute(delete(GangSeat).where(*_seats(gang)))


def stale_followers(gang: Gang) -> list[int]:
    """Node ranks whose worker stopped heartbeating its seat (machine lost, worker killed)."""
    with session_scope() as s:
        return list(s.scalars(select(GangSeat.node_rank).where(
            *_seats(gang), GangSeat.heartbeat_at < _stale_before())))


# --- a follower ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seat:
    job_id: str
    attempt: int
    worker_id: str
    rendezvous: Rendezvous
    resume_key: str | None


def take_seat(worker_id: str, devices: int | None = None) -> Seat | None:
    """Join the oldest open gang this worker can hold (`devices` per node, default the setting)."""
    devices = get_settings().worker_devices if devices is None else devices
    live = and_(Job.id == GangSeat.job_id, Job.attempt == GangSeat.attempt)
    with session_scope() as s:
        rows = s.execute(select(GangSeat.job_id, GangSeat.attempt, GangSeat.node_rank).join(Job, live).where(
            GangSeat.worker_id.is_(None), GangSeat.go.is_(False), Job.status == JobStatus.running,
            Job.devices <= devices).order_by(Job.created_at, GangSeat.node_rank).limit(32)).all()
    for job_id, attempt, rank in rows:
        with session_scope() as s:
            pk = (GangSeat.job_id == job_id, GangSeat.attempt == attempt, GangSeat.node_rank == rank)
            hit = s.execute(update(GangSeat).where(*pk, GangSeat.worker_id.is_(None))
                            .values(worker_id=worker_id, heartbeat_at=utcnow()))
            if not getattr(hit, "rowcount", 0):
                continue  # another worker took it
            row = s.execute(select(GangSeat.endpoint, GangSeat.spec).where(*pk)).one()
        spec = dict(row.spec)
        rdzv = Rendezvous(row.endpoint, run_id(job_id, attempt), int(spec["nodes"]), rank, int(spec["devices"]))
        return Seat(job_id, attempt, worker_id, rdzv, spec.get("resume_key"))
    return None


class SeatHeartbeat:
    """A follower's side of the lease: renews its seat's heartbeat, and watches for the leader's `go` and
    for the attempt's end (the job no longer running that attempt, or the seats gone)."""

    def __init__(self, seat: Seat) -> None:
        self.seat = seat
        self.settings = get_settings()
        self.go = threading.Event()
        self.ended = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"seat-{seat.job_id}", daemon=True)

    def __enter__(self) -> SeatHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.release()

    def _run(self) -> None:
        last_renew = time.monotonic()
        while not self._stop.wait(min(POLL_S, self.settings.heartbeat_seconds)):
            try:
                renew = time.monotonic() - last_renew >= self.settings.heartbeat_seconds
                self._check(renew)
                if renew:
                    last_renew = time.monotonic()
            except Exception:  # a DB blip must not stop the follower; the seat's heartbeat has slack
                log.exception("seat heartbeat failed", extra={"job_id": self.seat.job_id})

    def _pk(self) -> tuple[ColumnElement[bool], ...]:
        return (GangSeat.job_id == self.seat.job_id, GangSeat.attempt == self.seat.attempt,
                GangSeat.node_rank == self.seat.rendezvous.node_rank, GangSeat.worker_id == self.seat.worker_id)

    def _check(self, renew: bool) -> None:
        with session_scope() as s:
            if renew:
                s.execute(update(GangSeat).where(*self._pk()).values(heartbeat_at=utcnow()))
            go = s.scalar(select(GangSeat.go).where(*self._pk()))
            job = s.execute(select(Job.status, Job.attempt).where(Job.id == self.seat.job_id)).first()
        if go:
            self.go.set()
        if go is None or job is None or job.status != JobStatus.running or job.attempt != self.seat.attempt:
            self.ended.set()

    def release(self) -> None:
        """Leave the seat of a gang that never started (the leader may let another worker take it)."""
        try:
            with session_scope() as s:
                s.execute(update(GangSeat).where(*self._pk(), GangSeat.go.is_(False))
                          .values(worker_id=None, heartbeat_at=None))
        except Exception:
            log.exception("could not release the gang seat", extra={"job_id": self.seat.job_id})


def sweep_seats(s: Session) -> int:
    """The reaper's part: seats of attempts that are over (their leader died before closing them)."""
    live = select(Job.id).where(Job.id == GangSeat.job_id, Job.attempt == GangSeat.attempt,
                                Job.status == JobStatus.running).exists()
    hit = s.execute(delete(GangSeat).where(~live).execution_options(synchronize_session=False))
    return int(getattr(hit, "rowcount", 0) or 0)
