"""`o2o-launch`: a learner and N simulated actors on this machine, on loopback.

    o2o-launch                                  # pointmaze-umaze: pretrain, then 2 actors fine-tune online
    o2o-launch task=pusher actors=3 learner.online_updates=5000
    o2o-launch task=pusher learner.pretrained=runs/pretrain/pusher/<time>
    o2o-launch learner.utd=0.5 learner.algo.cql_alpha=1.0 actor.policy.noise_scale=0.5

`learner.*` is o2o-learner's config (OnlineConfig, learner/config.py) and `actor.*` every
o2o-actor's (ActorConfig, actor/config.py); `task=` and `preset=` pick the learner's config
groups as on its own command line, and the task is the actors' too. configs/launch.yaml holds
(and explains) where the launcher's defaults differ from those commands'; launch/config.py the
launcher's own settings (LaunchConfig).

Each process is the real command (`o2o-learner`, `o2o-actor`: launch/commands.py) started as a
subprocess, given the settings that differ from its own defaults; their logs (first line: the
command) go to <run>/learner.log and <run>/actor-<i>.log. A progress line shows updates, committed
rows, returns and the policy version. No torch here: the learner's imports stay in its process.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from o2o.datasets.builders import ensure_dataset
from o2o.datasets.minari_io import DatasetError
import o2o.learner.metric_keys as keys
from o2o.learner.commands import start_logged
from o2o.learner.fine_tuning import explicit_keys
from o2o.learner.metric_keys import evaluation_line, evaluation_summary

from .commands import actor_command, learner_command
from .config import GROUPS, LaunchConfig, check, hydra_overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Progress:
    """Reads the learner's metrics.jsonl as it grows and summarises it."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self.updates, self.rows, self.version = 0, 0, 0
        self.returns: list[float] = []
        self.successes: list[float] = []
        self.evaluations: list[dict] = []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            lines = f.readlines()
            self.offset = f.tell()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if keys.TRAIN_CRITIC_LOSS in record:
                self.updates = record[keys.STEP]
            if keys.TRAIN_COMMITTED_ROWS in record:
                self.rows = int(record[keys.TRAIN_COMMITTED_ROWS])
            if keys.ONLINE_RETURN in record:
                self.returns = (self.returns + [record[keys.ONLINE_RETURN]])[-20:]
                self.successes = (self.successes + [record[keys.ONLINE_SUCCESS]])[-20:]
                self.version = max(self.version, int(record[keys.ONLINE_POLICY_VERSION_END]))
            if keys.EVAL_ONLINE_STEPS in record:  # the learner's evaluations of the current policy
                self.evaluations.append(keys.fields(record, keys.EVAL))

    def postfix(self) -> dict:
        mean = lambda xs: f"{sum(xs) / len(xs):.2f}" if xs else "-"  # noqa: E731
        return {"rows": self.rows, "return": mean(self.returns), "success": mean(self.successes),
                "eval_success": f"{self.evaluations[-1][keys.SUCCESS]:.2f}" if self.evaluations else "-",
                "policy": self.version}  # fmt: skip


class StopSignals:
    """SIGINT and SIGTERM for the launcher: the first one while the run loop is interruptible raises
    KeyboardInterrupt (stop gracefully: the learner checkpoints); any other one means "now" and kills
    the children at once.

    Why one handler for the whole run: before, the stop path installed its own handler, and a second
    Ctrl-C landing between the KeyboardInterrupt and that install (a few ms; longer on a loaded machine)
    was taken as a first one: the launcher then waited up to LEARNER_STOP_S for the learner.
    """

    def __init__(self):
        self.urgent = threading.Event()
        self.received = 0
        self.interruptible = False  # in the run loop, no signal yet
        self.stopping = False  # past the run loop: any signal hurries the stop
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, *_) -> None:
        self.received += 1
        if self.interruptible:
            self.interruptible = False
            raise KeyboardInterrupt
        if self.received > 1 or self.stopping:
            if not self.urgent.is_set():
                tqdm.write("second signal: killing the learner and the actors now")
            self.urgent.set()
        # else a first signal while the children start: enter_loop raises it

    def enter_loop(self) -> None:
        self.interruptible = True
        if self.received:  # a signal came while the children started
            self.interruptible = False
            raise KeyboardInterrupt

    def leave_loop(self) -> None:
        self.interruptible, self.stopping = False, True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


LEARNER_STOP_S = 120.0  # a learner checkpoints and commits when stopped: give it time
ACTOR_STOP_S = 15.0


def stop_processes(learner: subprocess.Popen, actors: list[subprocess.Popen], urgent: threading.Event) -> None:
    """Stop the learner if it still runs (it checkpoints), then every actor; once ``urgent`` is set
    (a second signal), kill them at once.

    Why: the children run in their own sessions, so only this process can stop them; an
    actor left behind runs on forever (link.on_learner_lost=continue).
    """
    if learner.poll() is None:
        learner.send_signal(signal.SIGINT)
    _wait_or_kill(learner, LEARNER_STOP_S, urgent)
    for actor in actors:
        if actor.poll() is None:
            actor.send_signal(signal.SIGINT)
    deadline = time.monotonic() + ACTOR_STOP_S
    for actor in actors:
        _wait_or_kill(actor, max(0.0, deadline - time.monotonic()), urgent)


def _wait_or_kill(proc: subprocess.Popen, timeout_s: float, urgent: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if urgent.is_set() or time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            return
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass


def launch(cfg: LaunchConfig, run_dir: Path, groups: dict[str, str], explicit: set[str]) -> int:
    """Run the learner and the actors until the learner is done; ``groups``: the learner's config
    group choices (task, preset); ``explicit``: the keys given on the command line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    learner_cfg = cfg.learner
    if learner_cfg.build_missing_dataset and not learner_cfg.from_scratch:
        # Here, not in the learner, so the build shows its own progress bar (not a 0% pretraining one)
        # and a dataset built with other parameters is refused before anything starts.
        try:
            ensure_dataset(learner_cfg.dataset, learner_cfg.build_episodes, learner_cfg.build_seed,
                           rebuild=learner_cfg.rebuild_dataset)  # fmt: skip
        except DatasetError as err:
            print(f"o2o-launch: error: {err}", file=sys.stderr)
            return 2
    endpoint = f"tcp://127.0.0.1:{cfg.port or free_port()}"
    # A resumed learner goes on in its own folder (the one given, or the one holding the checkpoint given).
    resumed = Path(cfg.learner.resume or run_dir)
    learner_dir = resumed if resumed.is_dir() else resumed.parent
    print(f"o2o-launch: run folder {run_dir}, learner on {endpoint}, {cfg.actors} actors")

    def start(cmd: list[str], name: str) -> subprocess.Popen:
        return start_logged(cmd, run_dir / f"{name}.log", start_new_session=True)

    def start_actor(i: int) -> subprocess.Popen:
        return start(actor_command(cfg, explicit, run_dir, endpoint, i), f"actor-{i}")

    # SIGTERM (e.g. from `timeout` or a scheduler) stops the run like Ctrl-C: children are in
    # their own sessions, so only this process can stop them.
    signals = StopSignals()
    learner = start(learner_command(cfg, groups, explicit, run_dir, endpoint), "learner")
    actors = [start_actor(i) for i in range(cfg.actors)]
    progress = Progress(learner_dir / "metrics.jsonl")
    # Without a checkpoint to start from the learner builds the dataset and pretrains first (minutes):
    # a bar of its own, from the pretraining run's metrics, until the online phase starts.
    steps, online_updates = cfg.learner.steps, cfg.learner.online_updates
    pretrains = not (cfg.learner.pretrained or cfg.learner.resume or cfg.learner.from_scratch)
    pretraining = Progress(run_dir / "pretrain" / "metrics.jsonl") if pretrains else None
    bar = tqdm(total=steps if pretraining else online_updates,
               desc="pretraining" if pretraining else "online updates")  # fmt: skip
    starting_shown = False
    try:
        signals.enter_loop()
        while learner.poll() is None:
            time.sleep(cfg.refresh_s)
            for i, actor in enumerate(actors):
                if actor.poll() is not None:
                    tqdm.write(f"actor-{i} exited with {actor.returncode}: restarting it (see actor-{i}.log)")
                    actors[i] = start_actor(i)
            progress.poll()
            if pretraining is not None:
                pretraining.poll()
                if progress.updates == 0 and progress.rows == 0 and pretraining.updates < steps:
                    bar.n = pretraining.updates
                    bar.refresh()
                    continue
                bar.n = steps
                bar.close()
                pretraining, bar = None, tqdm(total=online_updates, desc="online updates")
            if progress.evaluations and not starting_shown:  # the policy online fine-tuning starts from
                first = progress.evaluations[0]
                offline = int(first[keys.ONLINE_STEPS]) == 0 and not cfg.learner.from_scratch
                tqdm.write(evaluation_summary("offline policy, where online fine-tuning starts" if offline
                                              else "first evaluation", first))  # fmt: skip
                starting_shown = True
            bar.n = progress.updates
            bar.set_postfix(progress.postfix())
        signals.leave_loop()  # the learner is done
    except KeyboardInterrupt:
        tqdm.write("interrupted: stopping the learner (it checkpoints) and the actors")
    finally:
        try:
            stop_processes(learner, actors, signals.urgent)
        finally:
            signals.restore()
        progress.poll()
        if pretraining is None:
            bar.n = progress.updates
        bar.close()
    if learner.returncode != 0:
        print(f"o2o-launch: the learner failed (exit {learner.returncode}); see {run_dir / 'learner.log'}", file=sys.stderr)
        print((run_dir / "learner.log").read_text()[-2000:], file=sys.stderr)
        return learner.returncode
    print(f"done: {progress.updates} online updates, {progress.rows} transitions in {learner_dir / 'replay'}, "
          f"policy version {progress.version}\n  policy:     {learner_dir / 'policy.onnx'}\n"
          f"  checkpoint: {learner_dir / 'checkpoint.pt'}")
    if len(progress.evaluations) >= 2:
        print(evaluation_line(progress.evaluations[0], progress.evaluations[-1]))
    return 0


@hydra.main(version_base=None, config_path="pkg://o2o.configs", config_name="launch")
def _hydra_main(dict_cfg: DictConfig) -> None:
    cfg: LaunchConfig = OmegaConf.to_object(dict_cfg)
    hydra_cfg = HydraConfig.get()
    explicit = explicit_keys(hydra_cfg.overrides.task)
    try:
        check(cfg, explicit)
    except ValueError as err:
        print(f"o2o-launch: error: {err}", file=sys.stderr)
        sys.exit(2)
    groups = {group: hydra_cfg.runtime.choices[f"{group}@learner"] for group in GROUPS}
    sys.exit(launch(cfg, Path(hydra_cfg.runtime.output_dir), groups, explicit))


def main() -> None:
    sys.argv[1:] = hydra_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
