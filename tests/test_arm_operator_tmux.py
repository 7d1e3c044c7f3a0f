"""The operator at the keyboard of a robot actor, in a real terminal (tmux): ``o2o-actor`` on the MuJoCo arm
with ``arm.reward=keys arm.reset=operator``; the keys start episodes, end them with success or failure (a key
pressed twice counts once), the e-stop cuts an episode and holds the arm until it is released, and a takeover
lets the keyboard act (interventions)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_arm_actor import actor_command, assert_left_held_and_disconnected, child_env, is_hold, journal

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="install tmux (apt-get install tmux)")


class Pane:
    """A detached tmux session on its own server socket running one command."""

    def __init__(self, command: list[str], cwd: Path, env: dict):
        self.socket = f"o2o-test-{uuid.uuid4().hex[:8]}"
        self.name = "arm"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k in ("PYTHONPATH", "PATH", "MUJOCO_GL"))
        # The shell traps Ctrl-C (a trap, not an ignore: the command still gets it) to report the exit status.
        line = f"trap 'true' INT; cd {shlex.quote(str(cwd))} && env {exports} {shlex.join(command)}; echo EXIT=$?; sleep 60"
        self.tmux("new-session", "-d", "-s", self.name, "-x", "200", "-y", "50", "sh", "-c", line)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", self.name)

    def wait_for(self, text: str, count: int = 1, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} x{count} never appeared; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def sends(tmp_path: Path) -> int:
    return sum(1 for e in journal(tmp_path) if e["op"] == "send")


def wait_for_sends(tmp_path: Path, more_than: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while sends(tmp_path) <= more_than:
        assert time.monotonic() < deadline, "the arm is not acting"
        time.sleep(0.05)


def test_the_operator_starts_ends_and_e_stops_episodes_with_keys_in_a_real_terminal(tmp_path):
    command = [arg for arg in actor_command(tmp_path, "oscillate", "arm.reset=operator", "control_hz=20",
                                            "max_episode_steps=100000") if arg != "arm.teleop=none"]  # fmt: skip
    command.append("arm.teleop=keyboard")
    pane = Pane(command, tmp_path, child_env())
    try:
        waiting = "the operator's reset key (g)"
        pane.wait_for(waiting)
        before = sends(tmp_path)
        time.sleep(0.5)
        assert all(is_hold(e) for e in journal(tmp_path)[before:] if e["op"] == "send"), "moved before the key"
        pane.keys("g")  # reset done: the episode starts
        wait_for_sends(tmp_path, before + 10)
        pane.keys("s", "s")  # success, pressed twice: one success
        pane.wait_for(waiting, count=2)
        pane.keys("g")
        wait_for_sends(tmp_path, sends(tmp_path) + 10)
        pane.keys("Space")  # e-stop: the episode is cut, the arm held, nothing sent until released
        pane.wait_for("e-stop")
        time.sleep(0.5)
        frozen = sends(tmp_path)
        time.sleep(1.0)
        assert all(is_hold(e) for e in journal(tmp_path)[frozen - 1:] if e["op"] == "send")
        pane.keys("g")  # releases the e-stop only
        pane.wait_for(waiting, count=3)
        pane.keys("g")  # confirms the reset
        wait_for_sends(tmp_path, sends(tmp_path) + 10)
        pane.keys("h")  # takeover: the keyboard acts (shoulder_pan up by arm.max_step per key 1)
        pane.wait_for("takeover ON")
        pane.keys("1")
        wait_for_sends(tmp_path, sends(tmp_path) + 5)
        pane.keys("h")  # back to the policy
        pane.wait_for("takeover off")
        pane.keys("f")  # failure
        pane.wait_for(waiting, count=4)
        pane.keys("C-c")
        screen = pane.wait_for("EXIT=")
        assert "EXIT=0" in screen, screen
    finally:
        pane.close()
    stats = json.loads((tmp_path / "stats.json").read_text())["actor"]
    assert stats["episodes"] == 2 and stats["successes_total"] == 1, stats  # the success and the failure
    assert stats["abandoned_episodes"] == 1 and stats["estops"] == 1, stats
    assert stats["interventions"] >= 5, stats  # the steps the keyboard acted, flagged for the store
    assert_left_held_and_disconnected(journal(tmp_path))
