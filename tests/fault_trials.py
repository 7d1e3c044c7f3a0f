"""Fault-injection trials of issue 10, over real processes (used by tests/test_fault_trials.py
and benchmarks/fault_trials.py, with different trial counts).

The parts are real: a learner process (``IngestServer`` over a ``ReplayStore`` on disk, fsync on,
the lightest real learner), actor processes that send through the actor's own ``Link`` with an
on-disk ``Spool`` over ZeroMQ on loopback TCP. Chunks are ``replay_peers.make_chunk(actor, seq)``:
a function of (actor, seq), so what any actor sent can be regenerated and compared with the store.

Trials (each raises ``TrialFailed`` naming its seed; ``python -m benchmarks.fault_trials --only
sigkill --sigkill 1 --seed S`` replays one's random draws):

* ``sigkill_trial``: the learner SIGKILLed at a random moment of ingest (a random fraction of the
  rows committed, then a random delay: kills land in commits too). The store opens, the
  verifier of ``o2o-store check`` finds no problem, every acked chunk is committed, every committed
  row is what was sent, the committed prefix read just before the kill is unchanged. The actors
  spool their last chunks while it is down; restarted, it gets them all: every actor's seqs
  0..N-1 each stored exactly once, equal to what was sent, and once it stopped cleanly the
  verifier finds nothing at all (what the killed commit left is overwritten or removed).
* ``sigstop_trial``: the learner paused (SIGSTOP) until every actor counted it lost (its
  ``LinkConfig.timeout_s``) and spooled its last chunks (every one on disk); resumed (SIGCONT),
  the actors drain: all stored exactly once.
* ``actor_restart_trial``: one actor process SIGKILLed at random moments and restarted on the same
  spool folder, ``kills`` times, the last run finishing: its seqs 0..N-1 each stored exactly once
  (no duplicate, no gap), none declared lost by the learner, each from the run that owned it
  (chunks carry their run as ``policy_version``).
* ``actor_kill_while_learner_away_trial``: the learner paused (SIGSTOP) or killed; the actor,
  having counted it lost, spools a few chunks (all within ``memory_chunks``), is SIGKILLed and
  restarted on the same spool folder, the learner resumed (or restarted): every chunk the killed
  run spooled is stored, from that run, exactly once (a spool that kept them in memory only lost
  them silently: the restarted actor reused their seqs, no gap).

No timing is asserted; waits are conditions with generous hang guards (``HANG_S``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np

from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.rows import ARRAY_NAMES
from o2o.datasets.store_check import check_store
from o2o.transport.config import LinkConfig, SpoolConfig
from o2o.transport.ingest import IngestServer
from o2o.transport.link import Link
from o2o.transport.spool import Spool
from replay_peers import ACT_DIM, OBS_DIM, expected_rows, make_chunk

# Each process is forked from a server that imported the heavy modules once: fresh, real
# processes without paying Python's and zarr's start-up each time (seconds on a loaded 2-core
# box). By name from the installed package: Python 3.11's fork server ignores the test folder.
CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["o2o.datasets.store_check", "o2o.transport.ingest", "o2o.transport.link"])
TASK = "test-task"
ROWS = 40  # rows per chunk (make_chunk's default)
HANG_S = 120.0  # hang guard of every wait: a trial that needs it has failed
LINK = dict(heartbeat_s=0.2, timeout_s=1.0, drain_s=0.0, id_in_use_timeout_s=0.0)  # retried till the hang guard
ACTOR_LIVE_S = 1.0  # the learner lets a restarted actor process in after the old one was silent this long

# Slots of an actor's shared counters (written by the actor process, read by the trial).
ACKED, NEXT, DEPTH, DISK, LOST, FIRST, SLOTS = range(7)


class TrialFailed(AssertionError):
    """A trial's check failed, or a wait ran into its hang guard (the message says which)."""


@dataclasses.dataclass
class TrialResult:
    kind: str
    seed: int
    seconds: float
    rows: int  # rows in the store at the end (all checked)
    rows_at_fault: int  # committed rows when the fault was injected
    faults: int  # kills, or pauses
    resent: int  # chunks the actors sent again (duplicates the learner skipped, resends after a restart)
    duplicates: int  # chunks the (last) learner skipped as already accepted
    lost_seqs: int  # seqs the learner declared lost (must stay 0)
    leftovers: list[str]  # kinds of harmless leftovers of a killed commit the verifier found after the fault
    detail: str = ""
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds from the trial's start


@dataclasses.dataclass
class Params:
    actors: tuple[str, ...] = ("a0", "a1")
    chunks: int = 60  # per actor, ROWS rows each
    tail: int = 12  # the last chunks of each actor, sent only once the fault is in place
    pace_s: float = 0.004  # between two chunks of one actor
    memory_chunks: int = 8  # spool memory cache (every chunk is on disk too)
    store_chunk_rows: int = 512  # Zarr rows per chunk: commits span chunk files


# ---------------------------------------------------------------- process bodies


class NoPolicies:
    """The link's ``PolicyTaker`` for senders without a policy (these learners publish none)."""

    built = refused = 0

    def submit(self, version: int, onnx: bytes, run_id: str = "") -> None:
        raise AssertionError("no policy is published in these trials")

    def latest(self):
        return None

    def close(self) -> None:
        pass


def _log_to(path: str) -> None:
    logging.basicConfig(filename=path, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def learner_main(store_path: str, endpoint: str, stop, stats_path: str, log_path: str) -> None:
    """The learner's ingest: serve until ``stop`` is set, then commit, close, write its stats."""
    _log_to(log_path)
    log = logging.getLogger("fault_trials")
    log.info("learner process up")
    store = ReplayStore.open(store_path, "a")
    server = IngestServer(store, endpoint, task=TASK, actor_live_s=ACTOR_LIVE_S).start()
    log.info("serving %s: %d rows committed", endpoint, len(store))
    while not stop.wait(0.05):
        if server.error is not None:
            raise server.error
    server.stop()
    store.close()
    Path(stats_path).write_text(json.dumps(server.stats()))


def actor_main(endpoint: str, actor_id: str, run: int, spool_dir: str, n_chunks: int, gate_at: int, gate, shared,
               pace_s: float, memory_chunks: int, stats_path: str, log_path: str) -> None:  # fmt: skip
    """Send chunks next_seq..n_chunks-1 through a real Link + on-disk Spool; the ones from
    ``gate_at`` on only once ``gate`` is set; return once all are acked. Chunks carry
    ``policy_version=run``, so the store tells which run of the actor sent each one."""
    _log_to(log_path)
    spool = Spool(memory_chunks, Path(spool_dir) / actor_id,
                  meta={"actor_id": actor_id, "task": TASK, "obs_dim": OBS_DIM, "action_dim": ACT_DIM})  # fmt: skip
    link = Link(endpoint, actor_id, TASK, OBS_DIM, ACT_DIM, spool, NoPolicies(), LinkConfig(**LINK)).start()
    if not link.wait_welcome(HANG_S):
        raise RuntimeError(f"actor {actor_id}: no welcome in {HANG_S} s")
    shared[FIRST] = link.status().next_seq
    while True:
        status = link.status()
        if status.stop:
            raise RuntimeError(f"actor {actor_id} stopped: {status.stop}")
        spool_stats = link.spool.stats()
        shared[ACKED], shared[NEXT] = link.stats.acked_seq, status.next_seq
        shared[DEPTH], shared[DISK] = spool_stats.depth, spool_stats.disk_chunks
        shared[LOST] = int(link.learner_lost)
        if link.stats.acked_seq >= n_chunks - 1:
            break
        seq = status.next_seq
        if seq < n_chunks and status.room and (seq < gate_at or gate.is_set()):
            link.add(make_chunk(actor_id, seq, policy_version=run))
        time.sleep(pace_s)
    link.close(drain_s=0)
    Path(stats_path).write_text(json.dumps({"first_seq": int(shared[FIRST]), "link": link.summary()}))


# ---------------------------------------------------------------- the trial's processes


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class Rig:
    """One trial's store, learner process and actor processes, in ``root``."""

    def __init__(self, root: Path, params: Params):
        self.root, self.params = root, params
        root.mkdir(parents=True, exist_ok=True)
        self.store_path = root / "replay"
        ReplayStore.create(self.store_path, OBS_DIM, ACT_DIM, chunk_rows=params.store_chunk_rows, task=TASK,
                           fsync=False).close()  # the learner's own commits fsync
        self.endpoint = free_endpoint()
        self.learner: mp.Process | None = None
        self.learner_runs = 0
        self._stop = None
        self.gate = CTX.Event()
        self.shared = {a: CTX.Array("q", SLOTS, lock=False) for a in params.actors}
        self.actors: dict[str, mp.Process] = {}
        self.actor_runs = {a: 0 for a in params.actors}
        self.reader = ReplayStore.open(self.store_path, "r")
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.phases[phase] = round(time.perf_counter() - self.t0, 2)

    # learner

    def start_learner(self) -> None:
        self.learner_runs += 1
        self._stop = CTX.Event()
        run = self.learner_runs
        args = (str(self.store_path), self.endpoint, self._stop, str(self.root / f"learner-{run}.json"),
                str(self.root / f"learner-{run}.log"))  # fmt: skip
        self.learner = CTX.Process(target=learner_main, args=args, daemon=True)
        self.learner.start()

    def signal_learner(self, sig: int) -> None:
        os.kill(self.learner.pid, sig)
        if sig == signal.SIGKILL:
            self.learner.join(HANG_S)
            if self.learner.exitcode != -signal.SIGKILL:
                raise TrialFailed(f"learner exit code {self.learner.exitcode} after SIGKILL\n{self.logs()}")

    def stop_learner(self) -> dict:
        """Clean stop; returns the learner's ingest stats."""
        self._stop.set()
        self.learner.join(HANG_S)
        if self.learner.exitcode != 0:
            raise TrialFailed(f"learner exit code {self.learner.exitcode} at its clean stop\n{self.logs()}")
        return json.loads((self.root / f"learner-{self.learner_runs}.json").read_text())

    # actors

    def start_actor(self, actor_id: str, gate_at: int | None = None, chunks: int | None = None) -> mp.Process:
        """A new run of ``actor_id``: it sends up to ``chunks`` (default all of ``params.chunks``)."""
        self.actor_runs[actor_id] += 1
        run = self.actor_runs[actor_id]
        shared = self.shared[actor_id]
        for slot in range(SLOTS):
            shared[slot] = -1 if slot in (ACKED, NEXT, FIRST) else 0
        p = self.params
        gate_at = p.chunks if gate_at is None else gate_at
        name = self.root / f"{actor_id}-{run}"
        args = (self.endpoint, actor_id, run, str(self.root / "spool"), chunks or p.chunks, gate_at, self.gate, shared,
                p.pace_s, p.memory_chunks, f"{name}.json", f"{name}.log")  # fmt: skip
        proc = self.actors[actor_id] = CTX.Process(target=actor_main, args=args, daemon=True)
        proc.start()
        return proc

    def actor_stats(self, actor_id: str) -> dict:
        return json.loads((self.root / f"{actor_id}-{self.actor_runs[actor_id]}.json").read_text())

    def wait_actors_done(self) -> None:
        deadline = time.monotonic() + HANG_S
        for actor_id, proc in self.actors.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode != 0:
                raise TrialFailed(f"actor {actor_id} did not finish (exit code {proc.exitcode})\n{self.logs()}")

    # waits and reads

    def wait(self, condition, what: str) -> None:
        deadline = time.monotonic() + HANG_S
        while not condition():
            for name, proc in [("learner", self.learner), *self.actors.items()]:
                if proc is not None and proc.exitcode not in (None, 0, -signal.SIGKILL):
                    raise TrialFailed(f"{name} died (exit code {proc.exitcode}) waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TrialFailed(f"hang guard: {HANG_S} s waiting for {what}\n{self.logs()}")
            time.sleep(0.002)

    def committed(self) -> int:
        try:
            return self.reader.refresh()
        except (OSError, ValueError):  # the record is replaced atomically; never torn, but be safe
            return len(self.reader)

    def total_rows(self) -> int:
        return len(self.params.actors) * self.params.chunks * ROWS

    def logs(self, limit: int = 2500) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-limit:]}" for p in sorted(self.root.glob("*.log")))

    def close(self) -> None:
        for proc in [self.learner, *self.actors.values()]:
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGCONT)  # a stopped learner cannot die otherwise
                proc.kill()
                proc.join()


# ---------------------------------------------------------------- checks


def check_committed(path: Path, sent: dict[str, int] | None = None, acked: dict[str, int] | None = None,
                    prefix: dict[str, np.ndarray] | None = None) -> tuple[ReplayStore, dict[str, list[str]]]:  # fmt: skip
    """The store opens and passes the verifier (leftovers of a killed commit allowed, returned);
    each actor's committed chunks are 0..committed_seq, in order, each once, equal to what was
    sent; with ``sent`` (actor -> chunks) exactly those; with ``acked``, every acked seq is
    committed; with ``prefix``, committed rows read earlier are unchanged."""
    try:
        store = ReplayStore.open(path, "r")
        found = check_store(path)
    except Exception as err:  # StoreError, a torn record...: the store does not open
        raise TrialFailed(f"the store does not open: {err!r}") from err
    if found.problems:
        raise TrialFailed(f"o2o-store check: problems in committed data: {found.problems}")
    rows = store.read()
    for code, actor_id in enumerate(store.actor_ids):
        n = store.committed_seq(actor_id) + 1
        if sent is not None and n != sent.get(actor_id):
            raise TrialFailed(f"actor {actor_id}: {n} chunks committed, {sent.get(actor_id)} sent")
        if acked is not None and n - 1 < acked.get(actor_id, -1):
            raise TrialFailed(f"actor {actor_id}: seq {acked[actor_id]} was acked, only {n - 1} is committed")
        mine = rows["actor"] == code
        if mine.sum() != n * ROWS:
            raise TrialFailed(f"actor {actor_id}: {mine.sum()} rows stored for seqs 0..{n - 1} ({n * ROWS} sent): "
                              "a duplicate or a gap")  # fmt: skip
        want = expected_rows(actor_id, n)
        for name in ARRAY_NAMES:
            if not np.array_equal(rows[name][mine], want[name].astype(rows[name].dtype)):
                raise TrialFailed(f"actor {actor_id}: column {name} differs from what was sent")
    if not ((rows["actor"] >= 0) & (rows["actor"] < len(store.actor_ids))).all():
        raise TrialFailed("rows of no known actor")
    if sent is not None and set(sent) - set(store.actor_ids):
        raise TrialFailed(f"actors {set(sent) - set(store.actor_ids)} sent chunks, none stored")
    if prefix is not None:
        n = len(prefix["actor"])
        if len(store) < n:
            raise TrialFailed(f"{len(store)} rows committed after the fault, {n} before")
        for name, values in prefix.items():
            now = rows[name][:n]
            if name == "mc_return":  # NaN until the episode's end is committed, then fixed
                now, values = now[np.isfinite(values)], values[np.isfinite(values)]
            if not np.array_equal(now, values):
                raise TrialFailed(f"committed column {name} changed in rows 0..{n - 1}")
    return store, found.leftovers


def check_runs(path: Path, actor_id: str, firsts: list[int]) -> None:
    """Each seq is stored as sent by the run that owned it: run i (1-based, its chunks' policy
    version) from its first seq ``firsts[i - 1]`` on, until the next run's first seq. So acked
    chunks of a killed run stay, and no chunk of a killed run lands after its successor began."""
    store = ReplayStore.open(path, "r")
    rows = store.read(columns=["actor", "policy_version"])
    runs = rows["policy_version"][rows["actor"] == store.actor_ids.index(actor_id)].reshape(-1, ROWS)
    if (runs != runs[:, :1]).any():
        raise TrialFailed(f"actor {actor_id}: a chunk mixes rows of two runs")
    owner = np.searchsorted(np.asarray(firsts), np.arange(len(runs)), side="right")  # max i with firsts[i-1] <= seq
    wrong = np.flatnonzero(runs[:, 0] != owner)
    if len(wrong):
        s = int(wrong[0])
        raise TrialFailed(f"actor {actor_id}: seq {s} stored from run {runs[s, 0]}, run {owner[s]} owned it "
                          f"(runs began at seqs {firsts})")  # fmt: skip


def _trial(kind: str, seed: int, root: Path, params: Params, body) -> TrialResult:
    """Run ``body(rig, rng)`` on a new rig; a failure names the trial and its seed."""
    t0 = time.perf_counter()
    rig = None
    try:
        rig = Rig(root, params)
        result = body(rig, np.random.default_rng(seed))
    except TrialFailed as err:
        raise TrialFailed(f"[{kind} trial, seed {seed}] {err}") from None
    finally:
        if rig is not None:
            rig.close()
    result.seconds = time.perf_counter() - t0
    return result


def _finish(rig: Rig, kind: str, seed: int, rows_at_fault: int, faults: int, leftovers: dict) -> TrialResult:
    """Every actor done, the learner stopped cleanly: all sent chunks stored exactly once, and
    the verifier finds nothing at all (no leftover either)."""
    rig.wait_actors_done()
    rig.mark("actors done")
    stats = rig.stop_learner()
    p = rig.params
    store, final_leftovers = check_committed(rig.store_path, sent={a: p.chunks for a in p.actors})
    rig.mark("checked")
    if final_leftovers:  # the restarted writer overwrote or removed what a killed one left
        raise TrialFailed(f"o2o-store check after the clean stop reports leftovers: {final_leftovers}")
    if len(store) != rig.total_rows():
        raise TrialFailed(f"{len(store)} rows stored, {rig.total_rows()} sent")
    actors = stats["actors"]
    lost = sum(actors[a]["lost_seqs"] for a in actors)
    rejected = {a: actors[a]["rejected"] for a in actors if actors[a]["rejected"]}
    if lost or rejected:
        raise TrialFailed(f"the learner declared {lost} seqs lost, rejected {rejected}")
    resent = sum(rig.actor_stats(a)["link"]["resent_chunks"] for a in rig.actors)
    duplicates = sum(actors[a]["duplicates"] for a in actors)
    return TrialResult(kind, seed, 0.0, len(store), rows_at_fault, faults, resent, duplicates, lost,
                       sorted(leftovers), phases=rig.phases)  # fmt: skip


# ---------------------------------------------------------------- trials


def sigkill_trial(root: Path, seed: int, params: Params | None = None) -> TrialResult:
    """SIGKILL the learner at a random moment of ingest; check; restart; all stored exactly once."""
    params = params or Params()

    def body(rig: Rig, rng: np.random.Generator) -> TrialResult:
        rig.start_learner()
        for actor_id in params.actors:
            rig.start_actor(actor_id, gate_at=params.chunks - params.tail)
        fraction, delay = rng.uniform(0.05, 0.75), rng.uniform(0.0, 0.1)
        target = int(fraction * (rig.total_rows() - len(params.actors) * params.tail * ROWS))
        rig.wait(lambda: rig.committed() > 0, "a first commit")
        rig.mark("first commit")
        rig.wait(lambda: rig.committed() >= target, f"{target} rows committed")
        time.sleep(delay)  # anywhere in a commit cycle: before, inside, after a commit
        prefix = rig.reader.read(0, rig.committed())
        rig.signal_learner(signal.SIGKILL)
        rig.mark("killed")
        # Acks the actors got came from the killed learner: each names a committed seq.
        time.sleep(0.3)
        acked = {a: int(rig.shared[a][ACKED]) for a in params.actors}
        store, leftovers = check_committed(rig.store_path, acked=acked, prefix=prefix)
        rows_at_kill = len(store)
        rig.mark("checked after the kill")
        rig.gate.set()  # the actors spool their last chunks while the learner is down
        rig.wait(lambda: all(rig.shared[a][NEXT] == params.chunks for a in params.actors), "the tail spooled")
        rig.start_learner()
        rig.mark("restarted")
        result = _finish(rig, "sigkill", seed, rows_at_kill, 1, leftovers)
        n_acked = sum(acked.values()) + len(acked)
        result.detail = f"killed at {fraction:.0%} + {1e3 * delay:.0f} ms; {n_acked} chunks acked before"
        return result

    return _trial("sigkill", seed, root, params, body)


def sigstop_trial(root: Path, seed: int, params: Params | None = None) -> TrialResult:
    """SIGSTOP the learner until every actor counts it lost and spooled its tail; SIGCONT; drain."""
    params = params or Params()

    def body(rig: Rig, rng: np.random.Generator) -> TrialResult:
        rig.start_learner()
        for actor_id in params.actors:
            rig.start_actor(actor_id, gate_at=params.chunks - params.tail)
        target = int(rng.uniform(0.05, 0.75) * (rig.total_rows() - len(params.actors) * params.tail * ROWS))
        rig.wait(lambda: rig.committed() > 0, "a first commit")
        rig.mark("first commit")
        rig.wait(lambda: rig.committed() >= target, f"{target} rows committed")
        time.sleep(rng.uniform(0.0, 0.1))
        prefix = rig.reader.read(0, rig.committed())
        rig.signal_learner(signal.SIGSTOP)
        rig.mark("stopped")
        t_stop = time.monotonic()
        rows_at_stop = len(prefix["actor"])
        # Past LinkConfig.timeout_s: each actor counts the learner lost ...
        rig.wait(lambda: all(rig.shared[a][LOST] for a in params.actors), "every actor to count the learner lost")
        rig.gate.set()  # ... and spools on (every chunk on disk, the oldest memory_chunks cached in memory too)
        rig.wait(lambda: all(rig.shared[a][NEXT] == params.chunks for a in params.actors), "the tail spooled")
        spooled = {a: (int(rig.shared[a][DEPTH]), int(rig.shared[a][DISK])) for a in params.actors}
        for actor_id, (depth, disk) in spooled.items():
            if depth < params.tail or disk != depth:
                raise TrialFailed(f"actor {actor_id}: {depth} chunks spooled ({disk} on disk) while paused, "
                                  f"expected >= {params.tail}, all on disk")  # fmt: skip
        paused_s = time.monotonic() - t_stop
        # Committed data is intact while paused (readers go on).
        check_committed(rig.store_path, prefix=prefix)
        rig.signal_learner(signal.SIGCONT)
        rig.mark("resumed")
        result = _finish(rig, "sigstop", seed, rows_at_stop, 1, {})
        lost_seen = {a: rig.actor_stats(a)["link"]["reconnects"] for a in params.actors}
        result.detail = (f"paused {paused_s:.1f} s (timeout_s {LINK['timeout_s']}); spooled (depth, on disk) "
                         f"{spooled}; reconnects {lost_seen}")  # fmt: skip
        return result

    return _trial("sigstop", seed, root, params, body)


FD_SLACK = 8


def actor_restart_trial(root: Path, seed: int, kills: int, params: Params | None = None) -> TrialResult:
    """SIGKILL one actor process ``kills`` times at random moments, restarting it on its spool;
    the last run finishes: its seqs 0..N-1 each stored exactly once, none declared lost."""
    params = params or Params(actors=("r0",), chunks=20 * kills + 40, memory_chunks=SpoolConfig().memory_chunks)
    (actor_id,) = params.actors

    def body(rig: Rig, rng: np.random.Generator) -> TrialResult:
        shared = rig.shared[actor_id]
        rig.start_learner()
        firsts, acked_at_kill, fds = [], [], []  # fds: the learner's open file descriptors after each welcome
        for _ in range(kills):
            proc = rig.start_actor(actor_id)
            rig.wait(lambda: shared[FIRST] >= 0, "the actor's welcome")
            first = int(shared[FIRST])
            firsts.append(first)
            fds.append(len(os.listdir(f"/proc/{rig.learner.pid}/fd")))  # sockets, store files, pipes
            if acked_at_kill and first <= acked_at_kill[-1]:
                raise TrialFailed(f"run {len(firsts)} starts at seq {first}, seq {acked_at_kill[-1]} was acked")
            n_new = int(rng.integers(1, 20))
            rig.wait(lambda: shared[NEXT] >= min(first + n_new, params.chunks) or not proc.is_alive(),
                     f"{n_new} chunks of run {len(firsts)}")  # fmt: skip
            time.sleep(rng.uniform(0.0, 0.03))
            if not proc.is_alive():
                raise TrialFailed(f"run {len(firsts)} ended before its kill (exit code {proc.exitcode})")
            acked_at_kill.append(int(shared[ACKED]))
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            rig.mark(f"kill {len(firsts)}")
        rig.start_actor(actor_id)  # the last run: to the end
        result = _finish(rig, "actor_restart", seed, 0, kills, {})
        firsts.append(rig.actor_stats(actor_id)["first_seq"])
        check_runs(rig.store_path, actor_id, firsts)
        # A killed actor's connection is closed by the learner: its descriptors do not grow with
        # the kills (a few of slack for store files open at the moment of counting).
        if fds and max(fds) > fds[0] + FD_SLACK:
            raise TrialFailed(f"the learner's open file descriptors grew with the actor kills: {fds}")
        result.detail = f"runs started at seqs {firsts}; learner open fds after each welcome {fds}"
        return result

    return _trial("actor_restart", seed, root, params, body)


def actor_kill_while_learner_away_trial(root: Path, seed: int, learner: str = "paused", acked: int = 10,
                                        spooled: int = 47, params: Params | None = None) -> TrialResult:  # fmt: skip
    """The learner acks ``acked`` chunks, then is paused (SIGSTOP) or killed (``learner="down"``);
    the actor counts it lost and spools ``spooled`` more (all within ``memory_chunks``), is
    SIGKILLed, and restarted on the same spool folder once the learner is back: the chunks the
    killed run spooled are all stored, as that run sent them, each once; none declared lost."""
    params = params or Params(actors=("k0",), chunks=acked + spooled + 20, memory_chunks=SpoolConfig().memory_chunks)
    (actor_id,) = params.actors
    if spooled > params.memory_chunks:
        raise ValueError(f"spooled={spooled} must fit in memory_chunks={params.memory_chunks}")

    def body(rig: Rig, rng: np.random.Generator) -> TrialResult:
        shared = rig.shared[actor_id]
        rig.start_learner()
        proc = rig.start_actor(actor_id, gate_at=acked, chunks=acked + spooled)
        rig.wait(lambda: shared[ACKED] == acked - 1, f"{acked} chunks acked")
        rig.signal_learner(signal.SIGSTOP if learner == "paused" else signal.SIGKILL)
        rig.mark(f"learner {learner}")
        rig.wait(lambda: shared[LOST] == 1, "the actor to count the learner lost")
        rig.gate.set()
        rig.wait(lambda: shared[NEXT] == acked + spooled and shared[DEPTH] == spooled, f"{spooled} chunks spooled")
        depth, disk = int(shared[DEPTH]), int(shared[DISK])
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        rig.mark("actor killed")
        if learner == "paused":
            rig.signal_learner(signal.SIGCONT)
        else:
            rig.start_learner()
        rig.start_actor(actor_id)  # run 2, on the same spool folder: to the end
        result = _finish(rig, "actor_kill_while_learner_away", seed, acked * ROWS, 2, {})
        first = rig.actor_stats(actor_id)["first_seq"]
        # Run 2 resends what run 1 spooled, then goes on after it; run 1's chunks are stored as it sent them.
        if first != acked + spooled:
            raise TrialFailed(f"run 2 began at seq {first}, but run 1 had spooled seqs {acked}..{acked + spooled - 1}: "
                              "lost, and no seq was declared lost")  # fmt: skip
        check_runs(rig.store_path, actor_id, [0, acked + spooled])
        result.detail = f"learner {learner}; run 1 spooled {depth} chunks ({disk} on disk); run 2 began at seq {first}"
        return result

    return _trial("actor_kill_while_learner_away", seed, root, params, body)
