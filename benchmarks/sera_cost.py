"""Cost of the exploration bonuses next to one Cal-QL update: SERA (target < 20% of an update at batch 256) and RND.

    python -m benchmarks.sera_cost [--repeats 7] [--device cpu|cuda] [--no-write]

Cases: batch 256 with 256x2 critics (this CPU's setting), and a "GPU-shaped" one, batch
1024 with the paper's 256x4 critics. The agent is ``CalQLAgent(obs, act, CalQLConfig(),
NetworkConfig(critic_hidden=...))`` (no bonus switched on), timed on ``agent.update(batch)``
from a fixed random batch. SERA gets half the batch (the online half, as the agent passes
it): ``SeraBonus(agent.critic, agent.policy, k=10)`` on ``agent.normalizer(obs)``; the kNN part alone
(``vcse_bonus``) is timed too. RND (512-512, 512 features, as OOO) is timed on ``bonus`` +
``update`` of the full batch's next observations, at batch 256 only.

Each repeat is one block that times every item in turn (update, SERA, kNN, RND), so a
shared machine's swings hit them alike; per-call times are medians over blocks, and the
ratio to an update is taken within each block, then the median. Obs 17, action 6
(HalfCheetah-sized, as benchmarks/calql_updates.py).
"""
# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (as benchmarks/calql_updates.py): on a shared
# 2-core machine spinning workers distort short timings.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.report` when run as a script
from benchmarks.report import machine_line, write_section
from o2o.learner.buffer import Batch
from o2o.learner.calql import CalQLAgent
from o2o.learner.config import CalQLConfig, NetworkConfig
from o2o.learner.rnd import RND
from o2o.learner.sera import SeraBonus, vcse_bonus

OBS_DIM, ACT_DIM, K = 17, 6, 10
CASES = [  # (label, batch, critic hidden, time RND)
    ("CPU: batch 256, critics 256x2", 256, [256, 256], True),
    ("GPU-shaped: batch 1024, critics 256x4", 1024, [256, 256, 256, 256], False),
]
TARGET = 0.20


def log(msg: str) -> None:
    print(f"[sera_cost] {msg}", file=sys.stderr, flush=True)


def make_batch(n: int, device: torch.device, gen: torch.Generator) -> Batch:
    """A Batch by keyword from its fields (so a renamed field still works); zeros where values do not matter."""
    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device) * 2 - 1

    given = {"obs": rand(n, OBS_DIM), "next_obs": rand(n, OBS_DIM), "action": rand(n, ACT_DIM) * 0.99,
             "reward": rand(n), "mc_return": rand(n) * 10}  # fmt: skip
    kwargs = {}
    for f in dataclasses.fields(Batch):
        if f.name in given:
            kwargs[f.name] = given[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = torch.zeros(n, device=device)  # e.g. done / terminated
    return Batch(**kwargs)


def timer(device: torch.device):
    def call(fn, n: int) -> float:
        """Seconds per call, mean of n back-to-back calls (synchronised on an accelerator)."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    return call


def run_case(
    label: str, batch_size: int, hidden: list[int], with_rnd: bool, repeats: int, device: torch.device
) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    agent = CalQLAgent(OBS_DIM, ACT_DIM, CalQLConfig(), NetworkConfig(critic_hidden=hidden), device=device)
    batch = make_batch(batch_size, device, gen)
    half = batch_size // 2
    sera = SeraBonus(agent.critic, agent.policy, k=K)
    online_obs, online_action = agent.normalizer(batch.obs[-half:]), batch.action[-half:]
    with torch.no_grad():
        q = agent.critic(online_obs, online_action).min(dim=0).values
    rnd = RND(OBS_DIM, device=device) if with_rnd else None

    def rnd_step():
        rnd.bonus(batch.next_obs)
        rnd.update(batch.next_obs)

    items = {
        "update": (lambda: agent.update(batch), 3 if batch_size > 256 else 5),
        "sera": (lambda: sera(online_obs, online_action), 50),
        "knn": (lambda: vcse_bonus(online_obs, q, K), 50),
    }
    if rnd is not None:
        items["rnd"] = (rnd_step, 20)
    call = timer(device)
    for fn, _ in items.values():  # warm-up (allocator, kernels, first-call overheads)
        call(fn, 3)
    blocks = {name: [] for name in items}
    for r in range(repeats):
        for name, (fn, n) in items.items():
            blocks[name].append(call(fn, n))
        log(f"{label}: block {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1] * 1e3:.2f} ms" for k, v in blocks.items()))
    per_call = {name: statistics.median(v) for name, v in blocks.items()}
    ratio = {name: statistics.median(b / u for b, u in zip(v, blocks["update"])) for name, v in blocks.items()}
    spread = {name: (min(v), max(v)) for name, v in blocks.items()}
    return {"label": label, "batch": batch_size, "rows": half, "per_call": per_call, "ratio": ratio,
            "spread": spread, "n": {name: n for name, (_, n) in items.items()}}  # fmt: skip


def ms(x: float) -> str:
    return f"{x * 1e3:.2f}" if x < 0.1 else f"{x * 1e3:.0f}"


def report(results: list[dict], args, device: torch.device, load: tuple[float, float]) -> str:
    lines = [
        "## Exploration bonuses: cost next to one Cal-QL update",
        "",
        f"`python -m benchmarks.sera_cost --repeats {args.repeats}` on {machine_line()}, device {device.type}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}. "
        f"Obs 17, action 6; agent `CalQLAgent(17, 6, CalQLConfig(), NetworkConfig(critic_hidden=...))` (policy 256x2, "
        f"2 critics, 10 CQL actions, no bonus on), `agent.update(batch)` from a fixed random batch. SERA: "
        f"`SeraBonus(agent.critic, agent.policy, k={K})` on the online half of the batch (frozen-critic V(s), "
        f"standardised, then VCSE's kNN estimate); kNN: `vcse_bonus` alone on the same rows. RND: 512-512 predictor "
        f"and target, 512 features, `bonus` + `update` on the batch's next observations (OOO's order).",
        "",
        f"Per call: median of {args.repeats} interleaved blocks (min-max over blocks); x update: the ratio to the "
        f"update's time in the same block, median over blocks. Load average {load[0]:.1f} before, {load[1]:.1f} after"
        + (" (other jobs shared the machine: compare ratios, not absolute times)." if max(load) > 1.5 else "."),
        "",
        "| case | item | rows | ms per call | x update |",
        "|---|---|---|---|---|",
    ]
    for res in results:
        names = {"update": "Cal-QL update", "sera": "SERA bonus (critic + kNN)", "knn": "of which kNN (`vcse_bonus`)",
                 "rnd": "RND bonus + update"}  # fmt: skip
        for key, name in names.items():
            if key not in res["per_call"]:
                continue
            rows = res["batch"] if key in ("update", "rnd") else res["rows"]
            lo, hi = res["spread"][key]
            ratio = "1" if key == "update" else f"{res['ratio'][key]:.1%}"
            per_call = f"{ms(res['per_call'][key])} ({ms(lo)}-{ms(hi)})"
            lines.append(f"| {res['label']} | {name} | {rows} | {per_call} | {ratio} |")
    lines.append("")
    for res in results:
        share = res["ratio"]["sera"]
        verdict = "met" if share < TARGET else "NOT met"
        lines.append(f"- {res['label']}: SERA bonus = {share:.1%} of an update "
                     f"(target < {TARGET:.0%}: {verdict}).")  # fmt: skip
    lines.append(
        "- The bonus runs without gradients on half the batch: one ensemble forward of the frozen critic and an "
        "N x N distance matrix with a k-th value per row (O(N^2) memory: 512 x 512 floats here). The GPU-shaped "
        "row is measured on this CPU, shapes only; an accelerator's figures would differ."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    results = [run_case(*case, repeats=args.repeats, device=device) for case in CASES]
    body = report(results, args, device, (load_before, os.getloadavg()[0]))
    print(body)
    if not args.no_write:
        write_section("sera_cost", body)


if __name__ == "__main__":
    main()
