"""Actor benchmarks: policy inference latency, actor throughput, policy hot-swap latency.

    python -m benchmarks.actor              # writes the "actor" section of BENCHMARKS.md
    python -m benchmarks.actor --quick      # fewer repeats, no file written

1. Inference, one observation, 256x2 Pusher policy, pinned to one core with one
   thread: onnxruntime (``OnnxPolicy.act``, what the actor runs) vs torch eager
   on the same module (``export_onnx.OnnxPolicy``). Goal: onnxruntime p99 < 100 us.
2. Steps/s on Pusher-v5: the full actor (policy + loop + link sending to a real
   IngestServer in another process, which commits to a Zarr store) vs bare env
   stepping with random actions. Goal: actor >= 85 % of bare.
3. Hot-swap: an ``o2o-actor`` process on loopback; time from ``publish_policy``
   to the first action taken with that version (its ``swaps`` stats), with the actor
   stepping flat out and at a robot-like 100 Hz. Goal < 50 ms.

Torch is used here only to build the policy and for the torch side of (1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import report

TASK = "pusher"
ROBOT_HZ = 100.0  # the hot-swap check is also run at a robot-like control rate


def build_policy(path: Path):
    import torch

    from o2o.envs import make_env
    from o2o.learner.checkpoint import AgentSpec
    from o2o.learner.export_onnx import ExportablePolicy as TorchPolicy
    from o2o.learner.export_onnx import export_policy

    env = make_env(TASK)
    torch.manual_seed(0)
    spec = AgentSpec(task=TASK, obs_dim=env.observation_space.shape[0], action_dim=env.action_space.shape[0],
                     action_low=env.action_space.low.tolist(), action_high=env.action_space.high.tolist(), algo={},
                     net={"policy_hidden": [256, 256], "critic_hidden": [256, 256]})  # fmt: skip
    agent = spec.build_agent()
    export_policy(agent, spec, path)
    return TorchPolicy.from_agent(agent, spec), spec


def percentiles(samples_ns: np.ndarray) -> tuple[float, float]:
    p50, p99 = np.percentile(samples_ns, [50, 99]) / 1000.0
    return float(p50), float(p99)


def bench_inference(onnx_path: Path, torch_module, obs_dim: int, action_dim: int, calls: int, repeats: int) -> dict:
    import torch

    from o2o.actor.onnx_policy import Exploration, OnnxPolicy

    core = max(os.sched_getaffinity(0))
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    policy = OnnxPolicy(onnx_path)
    explore = Exploration(action_dim, 1.0, seed=0)
    obs = np.random.default_rng(0).normal(size=(calls, obs_dim)).astype(np.float32)
    obs_t = torch.from_numpy(obs)
    noise_t = torch.randn(calls, action_dim)

    def ort_run() -> np.ndarray:
        times = np.empty(calls, np.int64)
        for i in range(calls):
            t = time.perf_counter_ns()
            policy.act(obs[i], explore.draw())
            times[i] = time.perf_counter_ns() - t
        return times

    def torch_run() -> np.ndarray:
        times = np.empty(calls, np.int64)
        with torch.inference_mode():
            for i in range(calls):
                t = time.perf_counter_ns()
                torch_module(obs_t[i : i + 1], noise_t[i : i + 1]).numpy()
                times[i] = time.perf_counter_ns() - t
        return times

    ort_run(), torch_run()  # warm-up
    results = {"onnxruntime": [], "torch": []}
    for _ in range(repeats):  # interleaved, so background load hits both sides alike
        results["onnxruntime"].append(percentiles(ort_run()))
        results["torch"].append(percentiles(torch_run()))
    os.sched_setaffinity(0, previous)
    return {side: {"p50": statistics.median(r[0] for r in runs), "p99": statistics.median(r[1] for r in runs),
                   "p99_runs": [round(r[1], 1) for r in runs]} for side, runs in results.items()}  # fmt: skip


def serve(store_path: str, endpoint_out, stop, core: int | None) -> None:
    """A learner's ingest side in its own process: IngestServer + Zarr store, until told to stop.
    Pinned here, before any thread starts, so that every server thread (ZeroMQ I/O, receive, commit)
    inherits the core: pinning the process from outside moves only its main thread."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    from o2o.datasets.replay_store import ReplayStore
    from o2o.transport.ingest import IngestServer

    store = ReplayStore.create_for_task(store_path, TASK)
    server = IngestServer(store).start()
    endpoint_out.send(server.endpoint)
    stop.wait()
    server.stop()
    endpoint_out.send(server.stats()["committed_rows"])


class Clock:
    """Wall time and this process's CPU time (all its threads) since creation."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, steps: int) -> tuple[float, float]:
        """(steps per wall second, CPU microseconds per step)."""
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return steps / wall, 1e6 * cpu / steps


def bench_bare(steps: int) -> tuple[float, float]:
    from o2o.envs import make_env

    env = make_env(TASK)
    actions = np.random.default_rng(0).uniform(env.action_space.low, env.action_space.high,
                                               (steps, env.action_space.shape[0])).astype(np.float32)  # fmt: skip
    env.reset(seed=0)
    clock = Clock()
    for i in range(steps):
        _, _, terminated, truncated, _ = env.step(actions[i])
        if terminated or truncated:
            env.reset()
    return clock.rates(steps)


def bench_env_and_policy(onnx_path: Path, steps: int) -> tuple[float, ...]:
    """Env steps with the policy's actions, no actor code: what any actor must at least spend.
    Also returns the mean us per inference and per env step, interleaved as an actor runs them."""
    from o2o.actor.onnx_policy import Exploration, OnnxPolicy
    from o2o.envs import make_env

    env = make_env(TASK)
    policy, explore = OnnxPolicy(onnx_path), Exploration(env.action_space.shape[0], 1.0, seed=0)
    obs, _ = env.reset(seed=0)
    clock = Clock()
    acting = stepping = 0
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        action = policy.act(obs, explore.draw())
        t1 = time.perf_counter_ns()
        obs, _, terminated, truncated, _ = env.step(action)
        acting, stepping = acting + t1 - t0, stepping + time.perf_counter_ns() - t1
        if terminated or truncated:
            obs, _ = env.reset()
    return (*clock.rates(steps), acting / steps / 1000, stepping / steps / 1000)


def bench_actor(onnx_path: Path, endpoint: str | None, spool_dir: Path, steps: int, run: int) -> tuple[tuple, dict]:
    """The full actor loop; ``endpoint`` None = a dry run (MemorySink, no link)."""
    from o2o.actor.config import ActorConfig, PolicyConfig, SpoolConfig
    from o2o.actor.loop import Actor
    from o2o.actor.main import assemble, wait_for_learner

    cfg = ActorConfig(task=TASK, learner=endpoint, actor_id=f"bench-{run}", log_every_s=1e9,
                      policy=PolicyConfig(path=str(onnx_path)), spool=SpoolConfig(dir=str(spool_dir)))  # fmt: skip
    env, sink, source, link = assemble(cfg)
    try:
        if link is not None:
            wait_for_learner(link, cfg)
        actor = Actor(env, sink, source, cfg)
        actor.run(max_steps=100)  # warm-up: first episode, session, connection
        clock = Clock()
        actor.run(max_steps=steps)
        rate = clock.rates(steps)
    finally:
        if link is not None:
            link.close()
        env.close()
    return rate, link.summary() if link is not None else {}


def bench_throughput(onnx_path: Path, steps: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        parent, child = ctx.Pipe()
        stop = ctx.Event()
        # The actor (and every baseline) on one core, the ingest server (all its threads) on the other, as
        # with a learner on its own machine; the actor's link and ZeroMQ I/O threads share the actor's core.
        cores = sorted(os.sched_getaffinity(0))
        previous = set(cores)
        server_core = cores[-1] if len(cores) > 1 else None
        server = ctx.Process(target=serve, args=(f"{tmp}/store", child, stop, server_core), daemon=True)
        server.start()
        endpoint = parent.recv()
        if server_core is not None:
            os.sched_setaffinity(0, {cores[0]})
        runs = {"bare": [], "env_policy": [], "dry": [], "actor": []}
        links = []
        for run in range(repeats):  # interleaved, so background load hits every variant alike
            runs["bare"].append(bench_bare(steps))
            runs["env_policy"].append(bench_env_and_policy(onnx_path, steps))
            runs["dry"].append(bench_actor(onnx_path, None, Path(tmp) / "spool", steps, run)[0])
            rate, link = bench_actor(onnx_path, endpoint, Path(tmp) / "spool", steps, run)
            runs["actor"].append(rate)
            links.append(link)
        stop.set()
        committed = parent.recv()
        server.join()
        os.sched_setaffinity(0, previous)
    assert all(link["spool_depth"] == 0 for link in links), "the actor exited with unacked chunks"
    return {**{k: statistics.median(r[0] for r in v) for k, v in runs.items()},
            "interleaved_act_us": statistics.median(r[2] for r in runs["env_policy"]),
            "interleaved_step_us": statistics.median(r[3] for r in runs["env_policy"]),
            **{f"{k}_cpu_us": statistics.median(r[1] for r in v) for k, v in runs.items()},
            **{f"{k}_runs": [r[0] for r in v] for k, v in runs.items()},
            "committed_rows": committed, "sent_chunks": sum(link["sent_chunks"] for link in links)}  # fmt: skip


def bench_hot_swap(onnx_path: Path, swaps: int, control_hz: float = 0.0) -> dict:
    from o2o.datasets.replay_store import ReplayStore
    from o2o.transport.ingest import IngestServer

    onnx = onnx_path.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        server = IngestServer(ReplayStore.create_for_task(f"{tmp}/store", TASK)).start()
        server.publish_policy(0, onnx)
        stats = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "o2o.actor.main", f"task={TASK}", f"learner={server.endpoint}", "actor_id=swap",
               f"spool.dir={tmp}/spool", f"stats_file={stats}", f"control_hz={control_hz}", "log_level=WARNING"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while server.stats()["actors"].get("swap", {}).get("rows", 0) == 0:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the actor process did not start sending")
                time.sleep(0.05)
            published = {}
            for version in range(1, swaps + 1):
                published[version] = time.time()
                server.publish_policy(version, onnx)
                time.sleep(0.25)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            server.stop()
        taken = {s[0]: s for s in json.loads(stats.read_text())["actor"]["swaps"]}
    rows = [(published[v], *taken[v][2:]) for v in published if v in taken]  # publish, acted, received, built
    ms = lambda a, b: [1000.0 * (r[b] - r[a]) for r in rows]  # noqa: E731
    total, arrive, build, pickup = ms(0, 1), ms(0, 2), ms(2, 3), ms(3, 1)
    return {"p50_ms": float(np.median(total)), "p99_ms": float(np.percentile(total, 99)), "max_ms": max(total),
            "arrive_p50_ms": float(np.median(arrive)), "build_p50_ms": float(np.median(build)),
            "pickup_p50_ms": float(np.median(pickup)), "swaps": len(rows), "published": swaps}  # fmt: skip


def swap_row(label: str, swap: dict) -> str:
    return (f"| {label} | {swap['p50_ms']:.1f} | {swap['p99_ms']:.1f} | {swap['max_ms']:.1f} | {swap['arrive_p50_ms']:.1f} "
            f"| {swap['build_p50_ms']:.1f} | {swap['pickup_p50_ms']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; do not write BENCHMARKS.md")
    args = parser.parse_args()
    calls, repeats, steps, swaps = (3000, 2, 3000, 5) if args.quick else (20000, 5, 20000, 20)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "policy.onnx"
        module, spec = build_policy(onnx_path)
        inference = bench_inference(onnx_path, module, spec.obs_dim, spec.action_dim, calls, repeats)
        print("inference (us):", json.dumps(inference))
        throughput = bench_throughput(onnx_path, steps, repeats)
        print("throughput (steps/s):", json.dumps(throughput))
        swap = bench_hot_swap(onnx_path, swaps)
        print("hot swap:", json.dumps(swap))
        paced = bench_hot_swap(onnx_path, swaps, control_hz=ROBOT_HZ)
        print(f"hot swap at {ROBOT_HZ} Hz:", json.dumps(paced))

    ort, pt = inference["onnxruntime"], inference["torch"]
    t = throughput
    ratio = t["actor"] / t["bare"]
    runs = lambda key: [round(x) for x in t[f"{key}_runs"]]  # noqa: E731
    command = "python -m benchmarks.actor"
    body = f"""## Actor (`{command}`)

Machine: {report.machine_line()}. Other jobs shared the machine's cores during the run: figures are
medians of {repeats} interleaved repeats (per-run values in brackets) and still carry that noise.

**Policy inference**, one observation, 256x2 Pusher policy (obs 23, action 7), pinned to one core, one thread,
{calls} calls per repeat:

| side | p50 (us) | p99 (us) | p99 per repeat |
|---|---|---|---|
| onnxruntime (`OnnxPolicy.act`, noise drawn) | {ort['p50']:.1f} | {ort['p99']:.1f} | {ort['p99_runs']} |
| torch eager (same module, `inference_mode`) | {pt['p50']:.1f} | {pt['p99']:.1f} | {pt['p99_runs']} |

onnxruntime / torch: p50 x{pt['p50'] / ort['p50']:.1f} faster, p99 x{pt['p99'] / ort['p99']:.1f} faster.
Goal p99 < 100 us: {"met" if ort['p99'] < 100 else "NOT met"}.

**Throughput**, Pusher-v5, {steps} steps per repeat:

| | steps/s (median) | / bare | per repeat | CPU us/step (process) |
|---|---|---|---|---|
| bare env, pre-drawn random actions | {t['bare']:.0f} | 100 % | {runs('bare')} | {t['bare_cpu_us']:.0f} |
| env + policy inference, no actor code | {t['env_policy']:.0f} | {t['env_policy'] / t['bare']:.0%} | {runs('env_policy')} | {t['env_policy_cpu_us']:.0f} |
| actor loop, dry run (`learner=null`: noise, clip, chunks to a MemorySink) | {t['dry']:.0f} | {t['dry'] / t['bare']:.0%} | {runs('dry')} | {t['dry_cpu_us']:.0f} |
| full actor (loop + link to an IngestServer process committing to Zarr) | {t['actor']:.0f} | {ratio:.0%} | {runs('actor')} | {t['actor_cpu_us']:.0f} |

Goal actor >= 85 % of bare: {"met" if ratio >= 0.85 else "NOT met"}. Every chunk was acked ({t['sent_chunks']} chunks,
{t['committed_rows']} rows committed). Against env + policy inference without any actor code, the dry loop
reaches {t['dry'] / t['env_policy']:.0%} and the full actor {t['actor'] / t['env_policy']:.0%}: what separates the
actor from bare stepping is the policy itself. Alone, a Pusher step costs {t['bare_cpu_us']:.0f} us and the policy
{ort['p50']:.0f} us; interleaved on one core each slows the other (here {t['interleaved_act_us']:.0f} us per
inference and {t['interleaved_step_us']:.0f} us per step: they evict each other's caches), so env + inference
alone runs at {t['env_policy'] / t['bare']:.0%} of bare stepping, below the 85 % goal before any actor code runs.
Pinning: the actor process (and every baseline) on one core, the ingest server process on the other; the
actor's link and ZeroMQ I/O threads share the actor's core. CPU per step of the full actor (all its threads)
is {t['actor_cpu_us'] / t['dry_cpu_us']:.2f}x the dry loop's; when the full actor's steps/s fall below the dry
loop's, it is the ingest server process and the other jobs on this machine taking CPU time (in a check with
the server process stopped by SIGSTOP, the linked actor ran at the dry loop's speed).

**Policy hot-swap** on loopback (an `o2o-actor` process, `policy.swap=step`): from `publish_policy` to the first
action taken with the new version, {swap['swaps']} swaps of the 256x2 policy.

| actor pace | p50 (ms) | p99 (ms) | max (ms) | publish -> arrival p50 | arrival -> session built p50 | built -> first action p50 |
|---|---|---|---|---|---|---|
{swap_row("flat out (worst case: the loop takes a whole core)", swap)}
{swap_row(f"control_hz={ROBOT_HZ:g} (a robot)", paced)}

Goal p99 < 50 ms: flat out {"met" if swap['p99_ms'] < 50 else "NOT met"}, at {ROBOT_HZ:g} Hz {"met" if paced['p99_ms'] < 50 else "NOT met"}.
Arrival includes the learner's send, loopback and the sha256 check; the session is built in the
background; at {ROBOT_HZ:g} Hz the first action waits for the next control tick.
"""
    print(body)
    if not args.quick:
        report.write_section("actor", body)


if __name__ == "__main__":
    main()
