"""Pixel Cal-QL gradient updates/s: ours (o2o.learner) vs d3rlpy 2.8 ``CalQL``, same images, same networks.

    python -m benchmarks.pixel_calql_updates [--batch 256] [--steps 3] [--repeats 3] [--device cpu|cuda]

Both sides: one 84x84x3 uint8 camera and no state vector, 2-d actions, batch 256, DrQ's encoder (conv 32
3x3 stride 2, three conv 32 3x3 stride 1, linear 50, LayerNorm, tanh), policy 256x2, 2 critics 256x4, 10
CQL actions, max-target backup, importance sampling, fixed CQL weight 5, auto entropy, same torch and
threads. d3rlpy runs in its own venv (benchmarks/calql_updates.py makes it) via benchmarks/_d3rlpy_side.py
``--pixels``; the two sides are timed in interleaved blocks (``update`` mode: pre-sampled mini-batches).

What differs by design (d3rlpy offers no way to match it): ours shares one encoder between critics and
policy (DrQ: the policy reads its features detached) and encodes each state once for its 10 CQL actions;
d3rlpy gives the policy and each critic their own encoder and runs the conv stack again for every
(state, action) pair of the CQL term. Ours also applies DrQ's random shift to obs and next_obs in every
update; d3rlpy 2.x has no image augmentation.
"""
# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import sys

import numpy as np
import torch

from benchmarks.calql_updates import BENCH_DIR, D3rlpy, _sync, ensure_venv, git_commit, log
from benchmarks.report import machine_line, write_section
from o2o.envs.obs_spec import CameraSpec, ObsSpec
from o2o.learner.buffer import Batch
from o2o.learner.calql import CalQLAgent
from o2o.learner.config import CalQLConfig, NetworkConfig

HW, ACT_DIM, EPISODE_LEN, CRITICS = 84, 2, 1000, [256, 256, 256, 256]


def make_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 84, 84, 3) uint8: smooth random blobs (timing does not depend on the content)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 7, axis=1), 7, axis=2)


def write_d3rlpy_data(path, images: np.ndarray) -> None:
    n, rng = len(images), np.random.default_rng(1)
    timeout = np.zeros(n, np.float32)
    timeout[EPISODE_LEN - 1 :: EPISODE_LEN] = 1
    timeout[-1] = 1
    np.savez(path, obs=images.transpose(0, 3, 1, 2).copy(), action=np.tanh(rng.normal(size=(n, ACT_DIM))).astype(np.float32),
             reward=rng.normal(size=n).astype(np.float32), terminal=np.zeros(n, np.float32), timeout=timeout)  # fmt: skip


class Ours:
    def __init__(self, images: np.ndarray, device: torch.device, batch_size: int):
        cfg = CalQLConfig(cql_alpha=5.0, cql_lagrange=False, cql_n_actions=10, cql_importance_sample=True,
                          cql_max_target_backup=True, auto_entropy=True, backup_entropy=False)
        net = NetworkConfig(policy_hidden=[256, 256], critic_hidden=CRITICS, num_critics=2)
        spec = ObsSpec(0, (CameraSpec("front", HW, HW, 3),))
        self.agent, self.device = CalQLAgent(spec, ACT_DIM, cfg, net, device), device
        frames, rng = torch.as_tensor(images).to(device), np.random.default_rng(2)

        def sample() -> Batch:
            rows = torch.as_tensor(rng.integers(0, len(images) - 1, batch_size), device=device)
            batch = batch_size
            return Batch(obs=torch.zeros(batch, 0, device=device), action=torch.rand(batch, ACT_DIM, device=device) * 2 - 1,
                         reward=torch.rand(batch, device=device), next_obs=torch.zeros(batch, 0, device=device),
                         terminated=torch.zeros(batch, device=device), mc_return=torch.rand(batch, device=device),
                         images={"front": frames[rows]}, next_images={"front": frames[rows + 1]})  # fmt: skip

        self.pool = [sample() for _ in range(4)]
        self.step = 0
        for _ in range(2):
            self.update()

    def update(self) -> None:
        self.agent.update(self.pool[self.step % len(self.pool)])
        self.step += 1

    def time(self, mode: str, steps: int) -> float:
        import time

        self.update()
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.update()
        _sync(self.device)
        return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed updates per block")
    p.add_argument("--repeats", type=int, default=3, help="interleaved blocks per side")
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-d3rlpy", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    args.mallopt = False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    BENCH_DIR.mkdir(exist_ok=True)
    images = make_images(args.frames)
    data_path = BENCH_DIR / "pixel_calql_data.npz"
    write_d3rlpy_data(data_path, images)
    commit, load_before = git_commit(), os.getloadavg()[0]
    sides = {"ours": Ours(images, torch.device(args.device), args.batch)}
    if not args.skip_d3rlpy:
        sides["d3rlpy"] = D3rlpy(ensure_venv(), data_path, CRITICS, args, extra=("--pixels",))
    rates = {name: [] for name in sides}
    for r in range(args.repeats):
        for name, side in sides.items():
            rates[name].append(side.time("update", args.steps))
        log(f"block {r + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.3f}" for n, v in rates.items()) + " upd/s")
    if "d3rlpy" in sides:
        sides["d3rlpy"].close()
    md = report(rates, args, commit, (load_before, os.getloadavg()[0]))
    print(md)
    if not args.no_write:
        write_section("pixel_calql_updates", md)
        log("wrote the pixel_calql_updates section of BENCHMARKS.md")


def report(rates: dict, args, commit: str, load: tuple[float, float]) -> str:
    cmd = "python -m benchmarks.pixel_calql_updates " + " ".join(sys.argv[1:])
    lines = [
        "## Pixel Cal-QL updates/s: ours vs d3rlpy 2.8 CalQL (issue 20 target: at least 1.25x)",
        "",
        f"`{cmd.strip()}` (o2o {commit}) on {machine_line()}, device {args.device}, torch {torch.__version__}, "
        f"{args.threads} threads; batch {args.batch}, one 84x84x3 camera, DrQ encoder, policy 256x2, 2 critics "
        f"256x4, 10 CQL actions. Median of {args.repeats} interleaved blocks of {args.steps} updates (min-max). "
        f"Load average {load[0]:.1f} before, {load[1]:.1f} after. Differences by design: see the script's docstring "
        "(d3rlpy re-encodes each (state, action) pair of the CQL term and has separate actor/critic encoders; "
        "ours encodes each state once and adds DrQ's random shift).",
        "",
        "| side | updates/s | min-max |",
        "|---|---|---|",
    ]
    for name, values in rates.items():
        lines.append(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} |")
    if "d3rlpy" in rates:
        ratio = statistics.median(a / b for a, b in zip(rates["ours"], rates["d3rlpy"]))
        lines += ["", f"ours / d3rlpy, paired by block: **{ratio:.1f}x** (target at least 1.25x: "
                  f"{'met' if ratio >= 1.25 else 'NOT met'})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
