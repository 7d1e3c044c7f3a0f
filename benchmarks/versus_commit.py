"""Ingest and actor benchmarks of this tree side by side with another commit, in one run.

    python -m benchmarks.versus_commit 26ef0c5            # 3 interleaved rounds, writes BENCHMARKS.md
    python -m benchmarks.versus_commit 26ef0c5 --rounds 1 --no-write

The other commit is checked out in a temporary git worktree and imported through a
package shim on PYTHONPATH (its own ``benchmarks/`` and ``o2o.*`` code, this venv);
rounds alternate old / new so that machine noise hits both sides alike. A refactor
must not slow the data path: this is the check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import machine_line, write_section

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("envs", "datasets", "learner", "actor", "transport", "configs")
INGEST_CMD = ["-m", "benchmarks.ingest", "--no-write", "--repeat", "1"]
ACTOR_CMD = ["-m", "benchmarks.actor", "--quick"]


def checkout(rev: str, where: Path) -> Path:
    """A worktree of ``rev`` plus an ``o2o`` shim folder that maps its packages; returns the shim."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where / "tree"), rev], check=True)
    shim = where / "shim" / "o2o"
    shim.mkdir(parents=True)
    for package in PACKAGES:
        if (where / "tree" / package).is_dir():
            (shim / package).symlink_to(where / "tree" / package)
    return shim.parent


def run(tree: Path, shim: Path | None, args: list[str], **env_vars: str) -> str:
    env = dict(os.environ, **env_vars)
    if shim is not None:
        env["PYTHONPATH"] = str(shim)
    done = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} in {tree} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def parse_ingest(out: str) -> float:
    return float(re.search(r"ingest, committed \+ acked:\s+([\d.]+)k", out).group(1)) * 1e3


def parse_actor(out: str) -> dict:
    def grab(label: str) -> dict:
        return json.loads(re.search(rf"^{re.escape(label)} (\{{.*\}})$", out, re.M).group(1))

    inference, throughput, swap = grab("inference (us):"), grab("throughput (steps/s):"), grab("hot swap:")
    return {"onnx_p50_us": inference["onnxruntime"]["p50"], "actor_steps_s": throughput["actor"],
            "dry_steps_s": throughput["dry"], "swap_p50_ms": swap["p50_ms"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the commit to compare with (e.g. the previous release)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {side: {"ingest": [], "ingest_no_fsync": [], "actor": []} for side in ("old", "new")}
    with tempfile.TemporaryDirectory(prefix="o2o-versus-") as tmp:
        shim = checkout(args.rev, Path(tmp))
        sides = {"old": (Path(tmp) / "tree", shim), "new": (ROOT, None)}
        try:
            for round_ in range(args.rounds):
                for side in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
                    tree, path = sides[side]
                    results[side]["ingest"].append(parse_ingest(run(tree, path, INGEST_CMD)))
                    # The same work as a tree from before fsync existed (which ignores the variable).
                    results[side]["ingest_no_fsync"].append(parse_ingest(run(tree, path, INGEST_CMD, O2O_BENCH_FSYNC="0")))
                    results[side]["actor"].append(parse_actor(run(tree, path, ACTOR_CMD)))
                    print(f"round {round_ + 1} {side}: ingest {results[side]['ingest'][-1] / 1e3:.0f}k rows/s "
                          f"({results[side]['ingest_no_fsync'][-1] / 1e3:.0f}k without fsync), "
                          f"actor {results[side]['actor'][-1]}", flush=True)  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "tree")], check=False)

    def median(side: str, key: str) -> float:
        if key.startswith("ingest"):
            return statistics.median(results[side][key])
        return statistics.median(r[key] for r in results[side]["actor"])

    rows = [("ingest, committed + acked (rows/s)", "ingest", 1e-3, "k"),
            ("ingest, fsync off (O2O_BENCH_FSYNC=0)", "ingest_no_fsync", 1e-3, "k"), ("actor, full (steps/s)", "actor_steps_s", 1, ""),
            ("actor, dry loop (steps/s)", "dry_steps_s", 1, ""), ("onnxruntime inference p50 (us)", "onnx_p50_us", 1, ""),
            ("policy hot-swap p50 (ms)", "swap_p50_ms", 1, "")]  # fmt: skip
    table = "\n".join(
        f"| {label} | {median('old', key) * scale:,.1f}{unit} | {median('new', key) * scale:,.1f}{unit} | "
        f"{median('new', key) / median('old', key):.2f} |"
        for label, key, scale, unit in rows
    )
    body = f"""## This tree ({head}) vs {args.rev}, side by side

`python -m benchmarks.versus_commit {args.rev} --rounds {args.rounds}`: `python -m benchmarks.ingest --no-write --repeat 1`
(with each tree's default fsync, then with `O2O_BENCH_FSYNC=0`: the same work as a tree from before fsync, which
ignores it) and `python -m benchmarks.actor --quick` of each tree, {args.rounds} interleaved rounds (old/new, then
new/old), medians.
Machine: {machine_line()}.

| measure | {args.rev} | {head} | new / old |
|---|---|---|---|
{table}
"""
    print(body)
    if not args.no_write:
        write_section("versus", body)


if __name__ == "__main__":
    main()
