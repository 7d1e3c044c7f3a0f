"""Camera ingest: K actor processes -> ZeroMQ -> IngestServer -> committed camera store, fsync on.

    python -m benchmarks.image_ingest                  # 1 and 8 actors, writes BENCHMARKS.md
    python -m benchmarks.image_ingest --no-write

Issue 20's target: at least 3,000 84x84x3 frames/s committed (and acked) with fsync on, for one actor and
for 8. Each sender is a minimal actor (benchmarks/ingest.py's protocol: hello with its cameras, then
30-row chunks with a window of unacked chunks), sending textured camera-like frames (benchmarks/
image_codec.py: drifting gradients, texture, sensor noise) of random-action maze episodes in the wire's
segment layout; timed from the first chunk until every chunk of every actor is acked. Then checks that
the store holds every row once and each row's frames are the ones sent.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import zmq

from benchmarks.image_codec import chunks_of, maze_episodes, textured
from benchmarks.ingest import run_senders
from benchmarks.report import machine_line, write_section
from o2o.datasets.replay_store import ReplayStore
from o2o.envs.obs_spec import CameraSpec, ObsSpec
from o2o.transport import wire
from o2o.transport.ingest import IngestServer

SPAWN = mp.get_context("spawn")
SPEC = ObsSpec(2, (CameraSpec("top", 84, 84, 3),))
TASK = "bench-camera"


def actor_chunks(actor: int, frames: int) -> list:
    return chunks_of(textured(maze_episodes(frames, seed=1000 * actor), seed=actor), f"actor-{actor}")


def sender(endpoint: str, actor: int, frames: int, window: int, ready, go, out) -> None:
    chunks = actor_chunks(actor, frames)
    encoded = [wire.encode_chunk(c) for c in chunks]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    hello = wire.Hello(f"actor-{actor}", TASK, SPEC.state_dim, 2, next_seq=0, cameras=SPEC.to_dict()["cameras"])
    sock.send_multipart(wire.encode(hello))
    welcome = wire.decode(sock.recv_multipart())
    assert isinstance(welcome, wire.Welcome), welcome
    ready.put(actor)
    go.wait()
    acked, seq, other = -1, 0, 0
    while acked < len(encoded) - 1:
        while seq < len(encoded) and seq - acked <= window:
            sock.send_multipart(encoded[seq], copy=False)
            seq += 1
        msg = wire.decode(sock.recv_multipart())
        if isinstance(msg, wire.Ack):
            acked = max(acked, msg.seq)
        else:
            other += 1
    out.put({"actor": actor, "frames": sum(len(c.frames["top"]) for c in chunks), "rows": sum(c.n for c in chunks),
             "unexpected": other})  # fmt: skip
    sock.close()
    ctx.term()


def measure(actors: int, frames: int, window: int, path: Path) -> dict:
    store = ReplayStore.create(path, SPEC, 2, task=TASK, fsync=True)
    server = IngestServer(store, "tcp://127.0.0.1:*", max_rows_per_s=None).start()
    ready, go, out = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=sender, args=(server.endpoint, k, frames, window, ready, go, out)) for k in range(actors)]
    results, elapsed = run_senders(procs, ready, go, out)
    server.stop()
    store.close()
    store = ReplayStore.open(path, "r")
    problems = [f"{r}" for r in results if r["unexpected"]]
    sent_rows = sum(r["rows"] for r in results)
    if len(store) != sent_rows:
        problems.append(f"store holds {len(store)} rows, {sent_rows} were sent")
    # Spot check: actor 0's first chunk reads back with the frames it sent.
    first = actor_chunks(0, frames)[0]
    rows = store.read(0, len(store), ["actor", "obs", "obs_frame", "next_frame", "frames/top"])
    mine = np.flatnonzero(rows["actor"] == store.actor_ids.index("actor-0"))[: first.n]
    local, _ = wire.frame_layout(first.terminated, first.truncated)
    if not np.array_equal(rows["frames/top"][rows["obs_frame"][mine]], first.frames["top"][local]):
        problems.append("actor-0's first chunk reads back with other frames")
    stored_frames = len(rows["frames/top"])
    store.close()
    sent_frames = sum(r["frames"] for r in results)
    return {"frames_per_s": sent_frames / elapsed, "rows_per_s": sent_rows / elapsed, "elapsed": elapsed,
            "sent_frames": sent_frames, "stored_frames": stored_frames, "rows": sent_rows, "problems": problems}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actors", type=int, nargs="+", default=[1, 8])
    p.add_argument("--frames", type=int, default=3000, help="frames each actor sends")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    results = {n: [] for n in args.actors}
    for r in range(args.repeat):
        for n in args.actors:
            with tempfile.TemporaryDirectory(prefix="o2o-image-ingest-", dir=Path(__file__).resolve().parent.parent) as tmp:
                out = measure(n, args.frames, args.window, Path(tmp) / "replay")
            results[n].append(out)
            print(f"run {r + 1}, {n} actor(s): {out['frames_per_s']:,.0f} frames/s sent and committed "
                  f"({out['rows_per_s']:,.0f} rows/s, {out['sent_frames']:,} frames sent, {out['stored_frames']:,} "
                  f"stored){' PROBLEMS: ' + str(out['problems']) if out['problems'] else ''}", flush=True)  # fmt: skip
    load_after = os.getloadavg()[0]
    cmd = "python -m benchmarks.image_ingest " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["## Camera ingest: actors -> ZeroMQ -> committed camera store (fsync on)", "",
             f"`{cmd.strip()}` on {machine_line()}; load average {load_before:.1f} before, {load_after:.1f} after. "
             f"Each actor sends {args.frames:,} textured 84x84x3 frames in 30-row chunks (random-action maze episodes, "
             f"the wire's segment layout), window {args.window}; timed until all are acked (committed with fsync). "
             f"Medians of {args.repeat} runs (min-max). Target (issue 20): at least 3,000 frames/s for 1 and for 8 actors.",
             "", "| actors | frames/s sent, committed | rows/s | frames stored / sent | target |", "|---|---|---|---|---|"]  # fmt: skip
    for n, runs in results.items():
        fps = [r["frames_per_s"] for r in runs]
        kept = runs[-1]["stored_frames"] / runs[-1]["sent_frames"]
        lines.append(f"| {n} | **{statistics.median(fps):,.0f}** ({min(fps):,.0f}-{max(fps):,.0f}) | "
                     f"{statistics.median(r['rows_per_s'] for r in runs):,.0f} | {kept:.3f} | "
                     f"{'met' if statistics.median(fps) >= 3000 else 'NOT met'} |")  # fmt: skip
    problems = [p for runs in results.values() for r in runs for p in r["problems"]]
    lines += ["", "Integrity: " + ("every row once, actor-0's first chunk reads back with its frames." if not problems
                                   else f"FAILED: {problems}")]  # fmt: skip
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.no_write and not problems:
        write_section("image_ingest", md)


if __name__ == "__main__":
    main()
