"""Cal-QL gradient updates/s: ours (o2o.learner) vs d3rlpy 2.8 ``CalQL``, same data, same config.

    python benchmarks/calql_updates.py [--hidden 256x2,256x4] [--steps 20] [--repeats 5]
                                       [--compile] [--mallopt] [--skip-d3rlpy] [--device cpu|cuda]

Both sides: synthetic dataset (100k transitions, obs 17, action 6, fixed seed), batch 256,
policy 256x2, 2 critics of the given widths, 10 CQL actions, max-target backup,
importance sampling, fixed CQL weight 5, auto entropy, same torch version and thread count.
d3rlpy pins gymnasium==1.0.0, so it runs in its own venv (.bench/d3rlpy-venv, made on
first use) as a subprocess (benchmarks/_d3rlpy_side.py) that stays alive, so that the
two sides are timed in interleaved blocks (the machine may be shared; medians reported).

Modes: ``update`` = one update step from a pre-sampled mini-batch (pure learner cost);
``loop`` = sample a mini-batch from the dataset + update (what a training loop pays).
FLOPs per update are counted with torch.utils.flop_counter (matmuls only) on each side and
set against the machine's fp32 matmul rate (8192x256 @ 256x256). Both processes run with
OMP_WAIT_POLICY=PASSIVE unless it is set already; --mallopt tunes glibc malloc in both.
"""
# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (set before torch loads libgomp; inherited by the
# d3rlpy subprocess). On a shared 2-core machine spinning workers made both sides 3-6x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from o2o.datasets.mc_return import mc_returns
from o2o.learner.buffer import TransitionBuffer
from o2o.learner.calql import CalQLAgent
from o2o.learner.config import CalQLConfig, NetworkConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.report` when run as a script
from benchmarks.report import machine_line, write_section
BENCH_DIR = ROOT / ".bench"
VENV = BENCH_DIR / "d3rlpy-venv"
SIDE = Path(__file__).with_name("_d3rlpy_side.py")
OBS_DIM, ACT_DIM, EPISODE_LEN, GAMMA = 17, 6, 1000, 0.99
POLICY_HIDDEN = [256, 256]


def log(msg: str) -> None:
    print(f"[calql_updates] {msg}", file=sys.stderr, flush=True)


def make_dataset(path: Path, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random but fixed episodes of EPISODE_LEN steps ending in timeouts; written to ``path`` for d3rlpy."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, OBS_DIM)).astype(np.float32)
    action = rng.uniform(-0.999, 0.999, (n, ACT_DIM)).astype(np.float32)
    reward = rng.standard_normal(n).astype(np.float32)
    terminal = np.zeros(n, np.float32)
    timeout = np.zeros(n, np.float32)
    timeout[EPISODE_LEN - 1 :: EPISODE_LEN] = timeout[-1] = 1.0
    np.savez(path, obs=obs, action=action, reward=reward, terminal=terminal, timeout=timeout)
    next_obs = np.concatenate([obs[1:], obs[-1:]])
    next_obs[timeout == 1] = obs[timeout == 1]  # episode tails: truncated, never bootstrapped far
    return dict(obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminal,
                mc_return=mc_returns(reward, terminal, timeout == 1, GAMMA))


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {VENV} (torch==2.13.0 first: the CPU wheel on this disk, then d3rlpy 2.8)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "d3rlpy==2.8.*"], check=True)
    return python


def matmul_rate(device: torch.device, iters: int = 40) -> float:
    """fp32 GFLOP/s of 8192x256 @ 256x256."""
    a, w = torch.randn(8192, 256, device=device), torch.randn(256, 256, device=device)
    for _ in range(3):
        a @ w
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ w
    _sync(device)
    return iters * 2 * 8192 * 256 * 256 / (time.perf_counter() - t0) / 1e9


def tune_malloc() -> None:
    """glibc: keep freed blocks up to 32 MB in the heap instead of unmapping them.

    Without it every update's ~16 MB activations come from fresh mmap pages (thousands of
    page faults per update). Applied to both sides with --mallopt.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """Our agent with a device buffer; ``time(mode, steps)`` mirrors the d3rlpy side's protocol."""

    def __init__(self, data: dict, hidden: list[int], device: torch.device, batch: int, compile: bool):
        cfg = CalQLConfig(cql_alpha=5.0, cql_lagrange=False, cql_n_actions=10, cql_importance_sample=True,
                          cql_max_target_backup=True, auto_entropy=True, backup_entropy=False, compile=compile)
        net = NetworkConfig(policy_hidden=POLICY_HIDDEN, critic_hidden=hidden, num_critics=2)
        self.agent = CalQLAgent(OBS_DIM, ACT_DIM, cfg, net, device)
        self.buffer = TransitionBuffer(OBS_DIM, ACT_DIM, len(data["reward"]), device)
        self.buffer.add(**data)
        self.batch, self.device = batch, device
        self.pool = [self.buffer.sample(batch) for _ in range(16)]
        self.step = 0
        for _ in range(3 if not compile else 6):  # compile: first calls trace and compile
            self.update()
        _sync(device)

    def update(self) -> None:
        self.agent.update(self.pool[self.step % len(self.pool)])
        self.step += 1

    def loop(self) -> None:
        self.agent.update(self.buffer.sample(self.batch))

    def gflop(self) -> float:
        with FlopCounterMode(display=False) as counter:
            self.agent._update(self.pool[0])  # the eager step, also when timing the compiled one
        return counter.get_total_flops() / 1e9

    def time(self, mode: str, steps: int) -> float:
        fn = getattr(self, mode)
        fn()
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(self.device)
        return steps / (time.perf_counter() - t0)


class D3rlpy:
    """The d3rlpy CalQL subprocess (its own venv), driven over stdin/stdout."""

    def __init__(self, python: Path, data_path: Path, hidden: list[int], args, extra: tuple[str, ...] = ()):
        cmd = [str(python), str(SIDE), "--data", str(data_path), "--critic-hidden", ",".join(map(str, hidden)),
               "--policy-hidden", ",".join(map(str, POLICY_HIDDEN)), "--batch", str(args.batch),
               "--threads", str(args.threads), "--device", args.device, *extra] + (["--mallopt"] if args.mallopt else [])
        self.log = BENCH_DIR / "d3rlpy_side.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"d3rlpy side died (exit {self.proc.wait()}); see {self.log}")
        return json.loads(line)

    def gflop(self) -> float:
        return self.info["gflop"]

    def time(self, mode: str, steps: int) -> float:
        self.proc.stdin.write(f"time {mode} {steps}\n")
        return self._read()["rate"]

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def parse_hidden(spec: str) -> list[list[int]]:
    """'256x2,256x4' -> [[256, 256], [256, 256, 256, 256]]."""
    return [[int(w)] * int(d) for w, d in (s.split("x") for s in spec.split(","))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", default="256x2,256x4", help="critic widths to run, WIDTHxDEPTH, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed updates per block")
    p.add_argument("--repeats", type=int, default=5, help="interleaved blocks per side and mode")
    p.add_argument("--modes", default="update,loop")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--transitions", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time our update under torch.compile")
    p.add_argument("--mallopt", action="store_true", help="glibc malloc tuning (no per-update page faults), both sides")
    p.add_argument("--skip-d3rlpy", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args()
    if args.mallopt:
        tune_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, modes = torch.device(args.device), args.modes.split(",")
    BENCH_DIR.mkdir(exist_ok=True)
    data_path = BENCH_DIR / "calql_updates_data.npz"
    data = make_dataset(data_path, args.transitions)
    python = None if args.skip_d3rlpy else ensure_venv()

    results = []  # (critics, side, mode, rates per block, gflop, matmul rates per block)
    load_before, commit = os.getloadavg()[0], git_commit()
    for hidden in parse_hidden(args.hidden):
        name = f"{hidden[0]}x{len(hidden)}"
        log(f"critics {name}: building sides")
        sides = {"ours": Ours(data, hidden, device, args.batch, compile=False)}
        if args.compile:
            log("compiling our update (torch.compile; minutes on a small CPU) ...")
            sides["ours+compile"] = Ours(data, hidden, device, args.batch, compile=True)
        if python is not None:
            sides["d3rlpy"] = D3rlpy(python, data_path, hidden, args)
        rates, peaks = {(s, m): [] for s in sides for m in modes}, []
        for r in range(args.repeats):
            peaks.append(matmul_rate(device))
            for mode in modes:
                for side_name, side in sides.items():
                    rates[side_name, mode].append(side.time(mode, args.steps))
            log(f"critics {name} block {r + 1}/{args.repeats}: "
                + ", ".join(f"{s}/{m} {v[-1]:.2f}" for (s, m), v in rates.items())
                + f" upd/s; matmul {peaks[-1]:.0f} GFLOP/s")
        for side_name, side in sides.items():
            gflop = side.gflop()
            for mode in modes:
                results.append((name, side_name, mode, rates[side_name, mode], gflop, peaks))
            if isinstance(side, D3rlpy):
                side.close()

    md = report(results, args, (load_before, os.getloadavg()[0]), commit)
    print(md)
    if not args.no_write:
        write_section("calql_updates", md)
        log("wrote the calql_updates section of BENCHMARKS.md")


NOTES = """Config differences d3rlpy does not let us remove (timing only; neither side is tuned for score):
- d3rlpy updates critic, then actor, then temperature, each with its own forward/backward
  (the actor step sees the new critic); ours computes every loss from the pre-update
  parameters with one backward and one fused Adam step (as the official JAX code).
- d3rlpy's actor loss backpropagates into the critic weights (gradients then discarded) and it
  evaluates Q(s, a_data) twice (TD and CQL terms); ours does neither.
- d3rlpy keeps each critic a separate nn.Sequential (one addmm per layer and critic, 2560-row
  calls); ours stacks the 2 critics and runs all 31 actions per state in one batched call.
- Fixed CQL weight: d3rlpy `alpha_learning_rate=0`, `initial_alpha=1`, `conservative_weight=5`
  (its `alpha_threshold` offset is then a constant with no gradient); ours `cql_lagrange=False, cql_alpha=5`.
- d3rlpy: per-parameter Adam (no fused/foreach on CPU), temperature loss on exp(log_temp),
  default torch Linear init; ours: fused Adam, loss on log_alpha, orthogonal init. Same lrs,
  gamma 0.99, tau 5e-3, no entropy in the backup, log-std clamp [-20, 2].
- `loop` mode: d3rlpy samples transitions one by one in Python and sums each sample's
  return-to-go at sampling time; ours indexes device tensors (MC returns precomputed)."""


def git_commit() -> str:
    """HEAD, with +dirty when the timed learner files have uncommitted changes (called at start-up)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    timed = [f"learner/{f}.py" for f in ("calql", "networks", "buffer", "config")]
    return (git("rev-parse", "--short", "HEAD") or "unknown commit") + ("+dirty" if git("status", "--porcelain", *timed) else "")


def paired_median(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def report(results, args, load: tuple[float, float], commit: str) -> str:
    cmd = "python benchmarks/calql_updates.py " + " ".join(sys.argv[1:])
    peaks = [p for *_, ps in results[:1] for p in ps]
    lines = [
        "## Cal-QL updates/s: ours vs d3rlpy 2.8 CalQL",
        "",
        f"`{cmd.strip()}` (o2o {commit}) on {machine_line()}, device {args.device}, torch {torch.__version__}, "
        f"{args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
        f"{', glibc mallopt tuning' if args.mallopt else ''}. Both sides: batch {args.batch}, policy 256x2, "
        "2 critics, 10 CQL actions, max-target backup, importance sampling, fixed CQL weight 5, auto entropy; "
        f"{args.transitions} random transitions (obs 17, act 6).",
        "",
        f"Updates/s: median of {args.repeats} interleaved blocks of {args.steps} updates (min-max). "
        "GFLOP/update: matmul FLOPs, forward + backward (torch.utils.flop_counter). % of matmul rate: "
        "achieved GFLOP/s over the fp32 rate of 8192x256 @ 256x256 measured before each block "
        f"(first critic size: median {statistics.median(peaks):.0f}, min {min(peaks):.0f}, max {max(peaks):.0f} GFLOP/s), "
        "median over blocks; ours / d3rlpy likewise paired by block. "
        f"Load average {load[0]:.1f} before, {load[1]:.1f} after (other jobs shared the machine).",
        "",
        "| critics | side | mode | updates/s | GFLOP/update | GFLOP/s | % of matmul rate | ours / d3rlpy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(h, s, m): r for h, s, m, r, *_ in results}
    for h, s, m, r, gflop, peaks in results:
        ref = by_key.get((h, "d3rlpy", m))
        ratio = f"{paired_median(r, ref):.2f}x" if ref and s != "d3rlpy" else ""
        pct = 100 * paired_median([x * gflop for x in r], peaks)
        lines.append(f"| {h} | {s} | {m} | {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f}) | {gflop:.2f} | "
                     f"{statistics.median(r) * gflop:.1f} | {pct:.0f}% | {ratio} |")
    return "\n".join(lines + ["", NOTES]) + "\n"


if __name__ == "__main__":
    main()
