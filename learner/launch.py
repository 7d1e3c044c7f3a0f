"""`o2o-launch`: a learner and N simulated actors on this machine, on loopback.

    o2o-launch                                  # pointmaze-umaze: pretrain, then 2 actors fine-tune online
    o2o-launch task=pusher actors=3 learner.online_updates=5000
    o2o-launch task=pusher learner.pretrained=runs/pretrain/pusher/<time>
    o2o-launch learner.utd=0.5 learner.algo.cql_alpha=1.0 actor.policy.noise_scale=0.5

`learner.*` is o2o-learner's config (OnlineConfig, learner/config.py) and `actor.*` every
o2o-actor's (ActorConfig, actor/config.py); `task=` and `preset=` pick the learner's config
groups as on its own command line, and the task is the actors' too. configs/launch.yaml holds
(and explains) where the launcher's defaults differ from those commands'.

Each process is the real command (`o2o-learner`, `o2o-actor`) started as a subprocess, given
the settings that differ from its own defaults; their logs (first line: the command) go to
<run>/learner.log and <run>/actor-<i>.log. A progress line shows updates, committed rows,
returns and the policy version.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from o2o.actor.config import ActorConfig, validate
from o2o.datasets.builders import ensure_dataset
from o2o.datasets.minari_io import DatasetError
from o2o.learner.config import OnlineConfig
from o2o.learner.fine_tuning import explicit_keys
from o2o.learner.online import evaluation_line, evaluation_summary
from o2o.learner.overrides import hydra_value
from o2o.transport.security import ACTORS


@dataclasses.dataclass
class LaunchConfig:
    """o2o-launch's own settings, with the learner's and the actors' nested (never copied)."""

    learner: OnlineConfig = field(default_factory=OnlineConfig)
    """o2o-learner's settings (learner/config.py), e.g. learner.utd=0.5 learner.algo.cql_alpha=1.0."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Every o2o-actor's settings (actor/config.py), e.g. actor.policy.noise_scale=0.5; actor i is
    named <actor_id>-<i> and seeded with seed * 1000 + i."""
    actors: int = 2
    """Simulated actor processes."""
    port: int = 0
    """Learner port on 127.0.0.1 (0 = a free one)."""
    refresh_s: float = 2.0
    """Progress refresh period."""


ConfigStore.instance().store(name="launch_schema", node=LaunchConfig)

GROUPS = ("task", "preset")
"""o2o-learner's config groups; launch.yaml composes them under `learner` (Hydra: task@learner)."""

SET_BY_LAUNCHER = {
    "learner.task": "task=NAME sets the task (and its dataset) for the learner and the actors",
    "actor.task": "task=NAME sets the task (and its dataset) for the learner and the actors",
    "learner.endpoint": "the learner listens on 127.0.0.1 (port=N picks the port)",
    "actor.learner": "the actors connect to the launched learner (port=N picks the port)",
    "learner.progress": "o2o-launch shows the progress",
    "actor.spool.dir": "the actors spool under <run>/spool",
    "actor.keys": "learner.keys=KEYS gives actor i the key folder KEYS/actors/<actor_id>-<i> (o2o-keys add)",
}
"""Keys the launcher sets for each process: refused on its command line, with what to use."""

FINE_TUNING_SECTIONS = ("algo", "net")
"""The learner takes these from the checkpoint unless its command line sets them (fine_tuning.py),
so they are passed only when given to o2o-launch, never because a preset changed them."""


def hydra_overrides(args: list[str]) -> list[str]:
    """`task=X` / `preset=X`, as on o2o-learner's command line, for launch.yaml's `task@learner` groups."""
    return [re.sub(rf"^({'|'.join(GROUPS)})=", r"\1@learner=", arg) for arg in args]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a structured config's leaves; dicts and lists stay whole values."""
    leaves = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            leaves.update(flatten(value, f"{prefix}{f.name}."))
        else:
            leaves[f"{prefix}{f.name}"] = value
    return leaves


def given(key: str, explicit: set[str]) -> bool:
    """Whether the command line set `key` or a config node above it (learner.algo=...)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1))


def command_overrides(section: str, cfg: Any, explicit: set[str], set_after: tuple[str, ...],
                      only_if_given: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """`key=value` for each field of ``cfg`` (launch config ``section``) that differs from its schema's
    default or was given on the command line, but those in ``set_after`` (the launcher adds them) and
    those under ``only_if_given`` unless given."""
    defaults = flatten(type(cfg)())
    args = []
    for key, value in flatten(cfg).items():
        full = f"{section}.{key}"
        if key in set_after or (key.split(".")[0] in only_if_given and not given(full, explicit)):
            continue
        if given(full, explicit) or value != defaults[key]:
            force = "++" if isinstance(value, dict) else ""  # a free-form dict (env_kwargs) takes new keys only so
            args.append(f"{force}{key}={hydra_value(value)}")
    return args


def check(cfg: LaunchConfig, explicit: set[str]) -> None:
    """Refuse what the launcher sets itself, and a bad actor config (else every actor exits and is restarted)."""
    for key, use in SET_BY_LAUNCHER.items():
        if given(key, explicit):
            raise ValueError(f"{key} is set by o2o-launch: {use}")
    validate(dataclasses.replace(cfg.actor, actor_id=f"{cfg.actor.actor_id}-0"))
    if cfg.learner.keys:
        names = [f"{cfg.actor.actor_id}-{i}" for i in range(cfg.actors)]
        missing = [n for n in names if not actor_keys(cfg, n).is_dir()]
        if missing:
            raise ValueError(f"learner.keys={cfg.learner.keys} has no keys for actor {', '.join(missing)}: run "
                             f"`o2o-keys add {cfg.learner.keys} {' '.join(names)}`")  # fmt: skip


def actor_keys(cfg: LaunchConfig, actor_id: str) -> Path:
    return (Path(cfg.learner.keys) / ACTORS / actor_id).absolute()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def learner_command(cfg: LaunchConfig, groups: dict[str, str], explicit: set[str], run_dir: Path,
                    endpoint: str) -> list[str]:  # fmt: skip
    return [
        sys.executable, "-m", "o2o.learner.online", *(f"{group}={choice}" for group, choice in groups.items()),
        *command_overrides("learner", cfg.learner, explicit, ("task", "endpoint", "progress"), FINE_TUNING_SECTIONS),
        f"endpoint={endpoint}", "progress=false", f"hydra.run.dir={hydra_value(str(run_dir))}",
    ]  # fmt: skip


def actor_command(cfg: LaunchConfig, explicit: set[str], run_dir: Path, endpoint: str, index: int) -> list[str]:
    actor = cfg.actor
    return [
        sys.executable, "-m", "o2o.actor.main",
        *command_overrides("actor", actor, explicit, ("task", "learner", "actor_id", "seed", "spool.dir", "keys")),
        f"task={hydra_value(cfg.learner.task)}", f"learner={endpoint}",
        f"actor_id={hydra_value(f'{actor.actor_id}-{index}')}", f"seed={actor.seed * 1000 + index}",
        f"spool.dir={hydra_value(str(run_dir / 'spool'))}",
        *([f"keys={hydra_value(str(actor_keys(cfg, f'{actor.actor_id}-{index}')))}"] if cfg.learner.keys else []),
        # A learner from scratch publishes no policy before its warm-up: the actors act at random.
        *(["policy.act_before_policy=true"] if cfg.learner.from_scratch and not given("actor.policy.act_before_policy",
                                                                                       explicit) else []),
    ]  # fmt: skip


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
            if "train/critic_loss" in record:
                self.updates = record["step"]
            if "train/committed_rows" in record:
                self.rows = int(record["train/committed_rows"])
            if "online/return" in record:
                self.returns = (self.returns + [record["online/return"]])[-20:]
                self.successes = (self.successes + [record["online/success"]])[-20:]
                self.version = max(self.version, int(record["online/policy_version_end"]))
            if "eval/online_steps" in record:  # the learner's evaluations of the current policy
                self.evaluations.append({k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")})

    def postfix(self) -> dict:
        mean = lambda xs: f"{sum(xs) / len(xs):.2f}" if xs else "-"  # noqa: E731
        return {"rows": self.rows, "return": mean(self.returns), "success": mean(self.successes),
                "eval_success": f"{self.evaluations[-1]['success']:.2f}" if self.evaluations else "-",
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
    logs = []

    def start(cmd: list[str], name: str) -> subprocess.Popen:
        log = open(run_dir / f"{name}.log", "w")
        log.write(shlex.join(cmd) + "\n")  # what ran, settings included
        log.flush()
        logs.append(log)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

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
                offline = int(first["online_steps"]) == 0 and not cfg.learner.from_scratch
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
        for log in logs:
            log.close()
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
