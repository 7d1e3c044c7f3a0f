"""`o2o-dataset`: list tasks, build o2o's local Minari datasets, inspect any Minari dataset."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from o2o.envs import TASKS, get_task
from o2o.envs.mujoco_camera import GLUnavailable

from .builders import BUILDER_MODULES, QUALITIES, build_dataset, dataset_id, recorded_build
from .data_settings import DataSettings
from .minari_io import DatasetError, datasets_root, load_transitions, open_dataset


def cmd_tasks(_args) -> None:
    for name, spec in sorted(TASKS.items()):
        builder = "builder" if name in BUILDER_MODULES else "no builder"
        print(f"{name:20s} {spec.env_id or '(a robot)':24s} {spec.reward:6s} {builder:10s} {spec.description}")


def cmd_build(args) -> None:
    tasks = list(BUILDER_MODULES) if args.task == "all" else [args.task]
    qualities = QUALITIES if args.quality == "all" else [args.quality]
    print(f"writing to {datasets_root()}")
    for task in tasks:
        for quality in qualities:
            dataset, s = build_dataset(task, quality, args.episodes, seed=args.seed, progress=not args.quiet)
            print(
                f"{dataset_id(task, quality)}: {s['episodes']} episodes, {s['steps']} steps, "
                f"success {s['success_rate']:.1%}, return {s['mean_return']:.2f} +- {s['std_return']:.2f}"
            )


def cmd_inspect(args) -> None:
    dataset = open_dataset(args.dataset)
    spec = dataset.spec
    print(f"id: {spec.dataset_id}\nenv: {spec.env_spec.id if spec.env_spec else None}")
    print(f"episodes: {spec.total_episodes}  steps: {spec.total_steps}")
    record = recorded_build(dataset)
    if record:
        print(f"built by o2o-dataset: {record.describe()}")
    print(f"observation space: {dataset.observation_space}\naction space: {dataset.action_space}")
    if args.task:
        data = load_transitions(dataset, get_task(args.task), DataSettings(discount=args.gamma))
        returns = data.episode_returns()
        print(f"flat obs dim {data.obs_dim}, action dim {data.action_dim}, trajectories {len(returns)}")
        for camera, frames in data.frames.items():  # a camera task: each frame once, rows point at them
            print(f"camera {camera}: {len(frames)} frames of {frames.shape[1:]} {frames.dtype} for {len(data)} rows")
        print(f"return per trajectory: mean {returns.mean():.3f}, min {returns.min():.3f}, max {returns.max():.3f}")
        print(f"MC return-to-go: mean {data.mc_return.mean():.3f}, min {data.mc_return.min():.3f}, max {data.mc_return.max():.3f}")
        print(f"terminal rows: {int(data.terminated.sum())}, reward mean {np.mean(data.reward):.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="o2o-dataset", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="list the task registry").set_defaults(func=cmd_tasks)
    build = sub.add_parser("build", help="build o2o/<task>/<quality>-v0 under MINARI_DATASETS_PATH")
    build.add_argument("--task", default="all", help=f"one of {', '.join(BUILDER_MODULES)} or all")
    build.add_argument("--quality", default="all", help=f"one of {', '.join(QUALITIES)} or all")
    build.add_argument("--episodes", type=int, default=None, help="episodes per dataset (default per task)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_build)
    inspect = sub.add_parser("inspect", help="summarise a Minari dataset (id or path)")
    inspect.add_argument("dataset")
    inspect.add_argument("--task", help="also load it as this o2o task: flat dims, returns, MC returns")
    inspect.add_argument("--gamma", type=float, default=DataSettings.discount, help="the discount of the MC returns")
    inspect.set_defaults(func=cmd_inspect)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (DatasetError, GLUnavailable, KeyError, ValueError) as err:
        print(f"o2o-dataset: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
