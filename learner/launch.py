"""`o2o-launch`: a learner and N simulated actors on this machine, on loopback.

    o2o-launch                                  # pointmaze-umaze: pretrain, then 2 actors fine-tune online
    o2o-launch task=pusher actors=3 online_updates=5000
    o2o-launch pretrained=runs/pretrain/pusher/<time> task=pusher
    o2o-launch learner_overrides='[algo.cql_alpha=1.0]' actor_overrides='[policy.noise_scale=0.5]'

Each process is the real command (`o2o-learner`, `o2o-actor`) started as a
subprocess; their logs go to <run>/learner.log and <run>/actor-<i>.log. A
progress line shows updates, committed rows, returns and the policy version.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm


@dataclasses.dataclass
class LaunchConfig:
    task: str = "pointmaze-umaze"
    dataset: str = "o2o/pointmaze-umaze/mixed-v0"
    """Offline dataset (set by the task group)."""
    build_missing_dataset: bool = True
    actors: int = 2
    """Simulated actor processes."""
    pretrained: str | None = None
    """Start from this checkpoint / run folder; None = pretrain for pretrain_steps first."""
    pretrain_steps: int = 2000
    online_updates: int = 2000
    utd: float = 1.0
    """Learner updates per online transition."""
    eval_every: int = 10
    """Each actor runs a deterministic evaluation episode (tagged eval, not trained on) every N episodes."""
    max_rows_ahead: int = 500
    """Transitions the actors may run ahead of updates / utd before the learner holds them."""
    publish_every: int = 250
    """The learner publishes a new policy to the actors every N updates."""
    control_hz: float = 50.0
    """Sim actors step at this rate, as robots would (0 = as fast as the CPU allows: a fast sim
    then outruns the learner within a second and spends the run held)."""
    port: int = 0
    """Learner port on 127.0.0.1 (0 = a free one)."""
    seed: int = 0
    out_dir: str = "runs/launch"
    learner_overrides: list[str] = field(default_factory=list)
    """Extra `key=value` overrides for o2o-learner (e.g. algo.cql_alpha=1.0)."""
    actor_overrides: list[str] = field(default_factory=list)
    """Extra `key=value` overrides for every o2o-actor (e.g. policy.noise_scale=0.5)."""
    refresh_s: float = 2.0
    """Progress refresh period."""


ConfigStore.instance().store(name="launch_schema", node=LaunchConfig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def learner_command(cfg: LaunchConfig, run_dir: Path, endpoint: str) -> list[str]:
    start = [f"pretrained={cfg.pretrained}"] if cfg.pretrained else [f"steps={cfg.pretrain_steps}"]
    return [
        sys.executable, "-m", "o2o.learner.online",
        f"task={cfg.task}", f"dataset={cfg.dataset}", f"build_missing_dataset={cfg.build_missing_dataset}",
        *start, f"online_updates={cfg.online_updates}", f"endpoint={endpoint}", f"seed={cfg.seed}",
        f"utd={cfg.utd}", f"max_rows_ahead={cfg.max_rows_ahead}", f"publish_every={cfg.publish_every}",
        "progress=false", f"hydra.run.dir={run_dir}", *cfg.learner_overrides,
    ]  # fmt: skip


def actor_command(cfg: LaunchConfig, run_dir: Path, endpoint: str, index: int) -> list[str]:
    return [
        sys.executable, "-m", "o2o.actor.main",
        f"task={cfg.task}", f"learner={endpoint}", f"actor_id=actor-{index}", f"seed={cfg.seed * 1000 + index}",
        f"spool.dir={run_dir / 'spool'}", f"control_hz={cfg.control_hz}", "log_every_s=10", f"eval_every={cfg.eval_every}", *cfg.actor_overrides,
    ]  # fmt: skip


class Progress:
    """Reads the learner's metrics.jsonl as it grows and summarises it."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self.updates, self.rows, self.version = 0, 0, 0
        self.returns: list[float] = []
        self.successes: list[float] = []
        self.eval_successes: list[float] = []

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
            if "eval/success" in record and "eval/eval" in record:
                self.eval_successes = (self.eval_successes + [record["eval/success"]])[-10:]

    def postfix(self) -> dict:
        mean = lambda xs: f"{sum(xs) / len(xs):.2f}" if xs else "-"  # noqa: E731
        return {"rows": self.rows, "return": mean(self.returns), "success": mean(self.successes),
                "eval_success": mean(self.eval_successes), "policy": self.version}  # fmt: skip


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


LEARNER_STOP_S = 120.0  # a learner checkpoints and commits when stopped: give it time
ACTOR_STOP_S = 15.0


def stop_processes(learner: subprocess.Popen, actors: list[subprocess.Popen]) -> None:
    """Stop the learner if it still runs (it checkpoints), then every actor, whatever signals
    arrive meanwhile.

    Why: the children run in their own sessions, so only this process can stop them; an
    actor left behind runs on forever (link.on_learner_lost=continue). A second Ctrl-C or a
    SIGTERM while this waits does not cut it short: it kills the children at once instead.
    """
    urgent = threading.Event()

    def hurry(*_) -> None:
        if not urgent.is_set():
            tqdm.write("second signal: killing the learner and the actors now")
        urgent.set()

    blocked = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # no signal between here and the new handlers
    previous = {sig: signal.signal(sig, hurry) for sig in blocked}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
    try:
        if learner.poll() is None:
            learner.send_signal(signal.SIGINT)
        _wait_or_kill(learner, LEARNER_STOP_S, urgent)
        for actor in actors:
            if actor.poll() is None:
                actor.send_signal(signal.SIGINT)
        deadline = time.monotonic() + ACTOR_STOP_S
        for actor in actors:
            _wait_or_kill(actor, max(0.0, deadline - time.monotonic()), urgent)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def launch(cfg: LaunchConfig, run_dir: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    endpoint = f"tcp://127.0.0.1:{cfg.port or free_port()}"
    print(f"o2o-launch: run folder {run_dir}, learner on {endpoint}, {cfg.actors} actors")
    logs = []

    def start(cmd: list[str], name: str) -> subprocess.Popen:
        log = open(run_dir / f"{name}.log", "w")
        logs.append(log)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    # SIGTERM (e.g. from `timeout` or a scheduler) stops the run like Ctrl-C: children are in
    # their own sessions, so only this process can stop them.
    signal.signal(signal.SIGTERM, _interrupt)
    learner = start(learner_command(cfg, run_dir, endpoint), "learner")
    actors = [start(actor_command(cfg, run_dir, endpoint, i), f"actor-{i}") for i in range(cfg.actors)]
    progress = Progress(run_dir / "metrics.jsonl")
    # Without a pretrained checkpoint the learner builds the dataset and pretrains first (minutes):
    # a bar of its own, from the pretraining run's metrics, until the online phase starts.
    pretraining = None if cfg.pretrained else Progress(run_dir / "pretrain" / "metrics.jsonl")
    bar = tqdm(total=cfg.pretrain_steps if pretraining else cfg.online_updates,
               desc="pretraining" if pretraining else "online updates")  # fmt: skip
    try:
        while learner.poll() is None:
            time.sleep(cfg.refresh_s)
            for i, actor in enumerate(actors):
                if actor.poll() is not None:
                    tqdm.write(f"actor-{i} exited with {actor.returncode}: restarting it (see actor-{i}.log)")
                    actors[i] = start(actor_command(cfg, run_dir, endpoint, i), f"actor-{i}")
            progress.poll()
            if pretraining is not None:
                pretraining.poll()
                if progress.updates == 0 and progress.rows == 0 and pretraining.updates < cfg.pretrain_steps:
                    bar.n = pretraining.updates
                    bar.refresh()
                    continue
                bar.n = cfg.pretrain_steps
                bar.close()
                pretraining, bar = None, tqdm(total=cfg.online_updates, desc="online updates")
            bar.n = progress.updates
            bar.set_postfix(progress.postfix())
    except KeyboardInterrupt:
        tqdm.write("interrupted: stopping the learner (it checkpoints) and the actors")
    finally:
        stop_processes(learner, actors)
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
    print(f"done: {progress.updates} online updates, {progress.rows} transitions in {run_dir / 'replay'}, "
          f"policy version {progress.version}\n  policy:     {run_dir / 'policy.onnx'}\n  checkpoint: {run_dir / 'checkpoint.pt'}")
    return 0


@hydra.main(version_base=None, config_path="pkg://o2o.configs", config_name="launch")
def _hydra_main(dict_cfg: DictConfig) -> None:
    cfg: LaunchConfig = OmegaConf.to_object(dict_cfg)
    sys.exit(launch(cfg, Path(HydraConfig.get().runtime.output_dir)))


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
