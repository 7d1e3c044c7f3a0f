"""Offline Cal-QL from pixels vs from state on one maze: `python -m o2o.experiments.pixels_vs_state`.

    python -m o2o.experiments.pixels_vs_state --root /work/pixels --seeds 0 1 2 --steps 3000   # runs, then reports
    python -m o2o.experiments.pixels_vs_state --root /work/pixels --report-only

Runs ``o2o-pretrain`` on ``pointmaze-umaze`` (state: position, velocity, goal) and on
``pointmaze-umaze-pixels`` (a 48x48 top view plus the ball's velocity; the same scripted dataset's
trajectories) with the same settings and seeds, two runs at a time with one torch thread each, and
writes the evaluations (10 deterministic episodes per run and point: 30 per point over 3 seeds) into
docs/RESULTS.md between ``<!-- pixels:start -->`` and ``<!-- pixels:end -->`` (o2o-report keeps it),
next to a policy of uniformly random actions on the same 30 episode seeds: a pixel policy that does not
beat it is a defect, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from o2o.envs import get_task, make_env

TASKS = {"state": "pointmaze-umaze", "pixels": "pointmaze-umaze-pixels"}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "RESULTS.md"


def run_dir(root: Path, kind: str, seed: int) -> Path:
    return root / kind / f"seed{seed}"


def command(root: Path, kind: str, seed: int, args) -> list[str]:
    return ["o2o-pretrain", f"task={TASKS[kind]}", f"seed={seed}", f"steps={args.steps}", f"eval.every={args.eval_every}",
            f"eval.episodes={args.episodes}", "threads=1", f"hydra.run.dir={run_dir(root, kind, seed)}"]  # fmt: skip


def run_all(root: Path, args) -> None:
    """Every (kind, seed) not finished yet, ``args.parallel`` at a time."""
    todo = [(k, s) for s in args.seeds for k in TASKS if not (run_dir(root, k, s) / "policy.onnx").exists()]
    running: list[tuple[subprocess.Popen, str]] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            kind, seed = todo.pop(0)
            folder = run_dir(root, kind, seed)
            folder.mkdir(parents=True, exist_ok=True)
            cmd = command(root, kind, seed, args)
            print("running:", " ".join(cmd), flush=True)
            log = open(folder / "stdout.log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), " ".join(cmd)))
        time.sleep(2)
        for proc, cmd in list(running):
            if proc.poll() is not None:
                running.remove((proc, cmd))
                if proc.returncode:
                    sys.exit(f"failed ({proc.returncode}): {cmd}")


def evaluations(folder: Path) -> dict[int, float]:
    """step -> eval success (0-1) of one run."""
    out = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/success" in row:
            out[row["step"]] = row["eval/success"]
    return out


def random_success(episodes: int, seed: int = 0) -> float:
    """Uniformly random actions on the maze, on the evaluation's episode seeds."""
    env = make_env(get_task(TASKS["state"]))
    rng, wins = np.random.default_rng(seed), 0
    for i in range(episodes):
        env.reset(seed=i)
        while True:
            _, _, terminated, truncated, info = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            if terminated or truncated:
                wins += bool(info.get("success", False))
                break
    env.close()
    return wins / episodes


def report(root: Path, args) -> str:
    runs = {kind: {s: evaluations(run_dir(root, kind, s)) for s in args.seeds} for kind in TASKS}
    steps = sorted(set.intersection(*(set(e) for kind in runs.values() for e in kind.values())))
    fmt = lambda xs: f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.pstdev(xs):.1f}"  # noqa: E731
    chance = random_success(args.episodes * len(args.seeds))
    lines = [
        "## Offline Cal-QL from pixels vs from state (pointmaze-umaze)",
        "",
        f"`python -m o2o.experiments.pixels_vs_state --root {root} --seeds {' '.join(map(str, args.seeds))} "
        f"--steps {args.steps}`: `o2o-pretrain` with its defaults (preset small: batch 256, policy 256x2, critics "
        f"256x2; Cal-QL on the o2o/<task>/mixed-v0 dataset, the same scripted trajectories for both tasks), "
        f"{args.steps} updates, one torch thread per run, two runs at a time on {machine()}. State: the maze's "
        "flat observation (position, velocity, goal). Pixels: a 48x48x3 top view (walls, goal, ball) and the "
        "ball's velocity, DrQ encoder trained by the critic, random shift. Success rate (%) of deterministic "
        f"evaluations, mean ± std over {len(args.seeds)} seeds of {args.episodes} episodes each "
        f"({args.episodes * len(args.seeds)} episodes per point).",
        "",
        "| updates | " + " | ".join(TASKS) + " |",
        "|---|" + "---|" * len(TASKS),
    ]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(fmt([runs[k][s][step] for s in args.seeds]) for k in TASKS) + " |")
    lines += ["", f"Uniformly random actions on the same {args.episodes * len(args.seeds)} episode seeds: "
              f"{100 * chance:.1f}% success."]  # fmt: skip
    wall = {k: [run_seconds(run_dir(root, k, s)) for s in args.seeds] for k in TASKS}
    lines += ["", "Wall time per run: " + ", ".join(f"{k} {statistics.mean(v) / 60:.1f} min" for k, v in wall.items())
              + " (two runs sharing the 2 cores)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_seconds(folder: Path) -> float:
    times = [json.loads(line)["time"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return max(times) - min(times)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores"


def write(body: str) -> None:
    start, end = "<!-- pixels:start -->", "<!-- pixels:end -->"
    text = DOCS.read_text()
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    DOCS.write_text(pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("runs/pixels_vs_state"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if not args.report_only:
        run_all(args.root, args)
    body = report(args.root, args)
    print(body)
    if not args.no_write:
        write(body)


if __name__ == "__main__":
    main()
