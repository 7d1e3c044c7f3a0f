"""The operator's keys (robot/operator.py) and the keys judge (robot/keys_judge.py).

Two real inputs: an OS pipe (the not-a-terminal path: what a harness or ``ssh host cmd <<<`` gives) for the
bookkeeping, and a real terminal (a detached tmux session running ``python -m o2o.robot.operator --demo``)
for cbreak mode, single keys without Enter and the terminal's mode after SIGTERM.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from o2o.robot.keys_judge import KeysJudge
from o2o.robot.operator import KeyboardTeleop, Operator, OperatorUnavailable, split_keys
from o2o.robot.seams import RESUME, Verdict


def wait_until(condition, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class PipeKeys:
    """An Operator reading a real pipe; ``press`` writes keys and waits until the reader took them."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        self.out = io.StringIO()
        self.operator = Operator(fd=self.read_fd, out=self.out, poll_s=0.01)

    def press(self, keys: str, count: int | None = None) -> None:
        before = self.operator.counters["keys"]
        os.write(self.write_fd, keys.encode())
        n = len(split_keys(keys)) if count is None else count
        wait_until(lambda: self.operator.counters["keys"] >= before + n, f"the reader to take {keys!r}")

    def close(self) -> None:
        self.operator.close()
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def keys():
    k = PipeKeys()
    yield k
    k.close()


def test_verdict_key_twice_gives_one_verdict(keys):
    judge = KeysJudge(keys.operator, reward_success=1.0, reward_failure=-1.0, reward_step=0.0)
    judge.begin_episode()
    keys.press("ss")
    assert judge.judge(np.zeros(3, np.float32), {}) == Verdict(reward=1.0, success=True, terminated=True)
    assert judge.judge(np.zeros(3, np.float32), {}) == Verdict(reward=0.0)  # the second s gave nothing
    keys.press("f")  # changing one's mind after the verdict: also dropped, the first verdict stands
    assert keys.operator.events() == []
    assert keys.operator.counters["repeated"] == 2 and keys.operator.counters["success"] == 1
    assert "already ended (success)" in keys.out.getvalue()


def test_keys_between_episodes_never_reach_the_next_one(keys):
    judge = KeysJudge(keys.operator, reward_success=1.0, reward_failure=-1.0, reward_step=-0.1)
    keys.press("s")  # before the first episode
    judge.begin_episode()
    keys.press("f")
    assert judge.judge(None, {}) == Verdict(reward=-1.0, terminated=True)
    keys.operator.close_episode()  # the reset starts
    keys.press("sn")
    judge.begin_episode()
    assert judge.judge(None, {}) == Verdict(reward=-0.1)
    assert keys.operator.counters["ignored"] == 3
    # A verdict accepted as the episode hit its time limit (never collected): dropped at the next episode.
    keys.press("s")
    judge.begin_episode()
    assert judge.judge(None, {}) == Verdict(reward=-0.1)
    assert keys.operator.counters["ignored"] == 4 and keys.operator.counters["success"] == 0
    assert "came after the episode had ended: dropped" in keys.out.getvalue()


def test_end_episode_truncates_and_unknown_keys_are_counted(keys):
    judge = KeysJudge(keys.operator, reward_step=-0.5)
    judge.begin_episode()
    keys.press("x\x1b[AZ")  # x, the up arrow (one key), Z
    assert keys.operator.counters["unknown"] == 3
    assert judge.judge(None, {}) == Verdict(reward=-0.5)
    keys.press("n\n")
    assert judge.judge(None, {}) == Verdict(reward=-0.5, truncated=True)


def test_estop_latches_until_g_and_g_confirms_only_a_running_wait(keys):
    op = keys.operator
    keys.press(" ")
    assert op.estopped
    keys.press(" s")  # still latched: a second e-stop is counted; a verdict key does not release it
    assert op.estopped and op.counters["repeated"] == 1
    keys.press("g")
    assert not op.estopped
    keys.press("g")  # nothing waits: ignored, and it will not confirm the next wait
    assert op.counters["ignored"] == 2  # the s (no episode) and this g
    holds = []
    assert op.wait_for(RESUME, lambda: holds.append(1), lambda: len(holds) >= 5, every_s=0.01) is False
    assert len(holds) == 5  # held while waiting; the early g did not count


def test_wait_for_holds_until_g_and_a_release_is_not_a_confirmation(keys):
    op, holds, result = keys.operator, [], []
    waiter = threading.Thread(target=lambda: result.append(op.wait_for(RESUME, lambda: holds.append(1), lambda: False,
                                                                       every_s=0.01)))  # fmt: skip
    waiter.start()
    wait_until(lambda: len(holds) >= 3, "the wait to hold the arm")
    keys.press(" ")
    keys.press("g")  # releases the e-stop only
    time.sleep(0.1)
    assert waiter.is_alive() and not result
    keys.press("g")
    waiter.join(2)
    assert result == [True] and op.counters["resume"] == 1
    holds.clear()  # the next wait needs a g of its own
    assert op.wait_for(RESUME, lambda: holds.append(1), lambda: len(holds) >= 5, every_s=0.01) is False
    # Begun while e-stopped, a wait returns at the release.
    keys.press(" ")
    waiter = threading.Thread(target=lambda: result.append(op.wait_for(RESUME, lambda: None, lambda: False,
                                                                       every_s=0.01)))  # fmt: skip
    waiter.start()
    keys.press("g")
    waiter.join(2)
    assert result == [True, True] and not op.estopped


def test_closed_input_raises_instead_of_waiting_forever(keys):
    os.close(keys.write_fd)  # the harness went away: end of file
    wait_until(lambda: keys.operator.closed_input is not None, "the reader to see the end of the input")
    with pytest.raises(OperatorUnavailable, match="no key can arrive"):
        keys.operator.wait_for(RESUME, lambda: None, lambda: False)
    assert keys.out.getvalue().count("no operator keys") == 1


def test_closing_the_operator_ends_a_wait(keys):
    """SIGTERM closes the operator (its handler) before the actor's stop reaches the reset: the wait
    ends as stopped (False), not as an error."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(keys.operator.wait_for(RESUME, lambda: None, lambda: False)),
                              daemon=True)  # fmt: skip
    thread.start()
    time.sleep(0.1)
    keys.operator.close()
    thread.join(2)
    assert result == [False]


def test_keyboard_teleop_moves_targets_from_the_measured_pose_during_takeover(keys):
    measured = {"shoulder_pan.pos": 10.0, "shoulder_lift.pos": -20.0, "elbow_flex.pos": 30.0}
    teleop = KeyboardTeleop(list(measured), lambda: measured, step=2.5, operator=keys.operator)
    help_line = "after h (takeover): shoulder_pan.pos 1+ q-, shoulder_lift.pos 2+ w-, elbow_flex.pos 3+ e-"
    assert help_line in keys.out.getvalue()
    keys.press("1")  # no takeover yet: ignored
    assert keys.operator.counters["ignored"] == 1
    keys.press("h11we")
    assert keys.operator.takeover
    assert teleop.get_action() == {"shoulder_pan.pos": 15.0, "shoulder_lift.pos": -22.5, "elbow_flex.pos": 27.5}
    assert teleop.get_action() == {"shoulder_pan.pos": 15.0, "shoulder_lift.pos": -22.5, "elbow_flex.pos": 27.5}
    keys.press("h")  # the policy drives; the arm moves meanwhile
    measured.update({"shoulder_pan.pos": 0.0, "shoulder_lift.pos": 0.0, "elbow_flex.pos": 0.0})
    keys.press("h3")  # takes over again: from where the arm is now
    assert teleop.get_action() == {"shoulder_pan.pos": 0.0, "shoulder_lift.pos": 0.0, "elbow_flex.pos": 2.5}
    with pytest.raises(ValueError, match="operator keys"):
        KeyboardTeleop(["a.pos"], lambda: [0.0], 1.0, operator=keys.operator, up_keys="s", down_keys="q")


def test_keys_judge_rejects_a_non_finite_reward(keys):
    with pytest.raises(ValueError, match="reward_failure must be a finite number"):
        KeysJudge(keys.operator, reward_failure=float("nan"))


def test_sigterm_restores_the_terminal_then_runs_the_previous_handler():
    """On a pty of its own (a real TTY): cbreak while open; SIGTERM restores the mode and hands the
    signal to the handler that was there before (the actor's graceful stop), which is put back."""
    import termios

    master, slave = os.openpty()
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        before = termios.tcgetattr(slave)
        op = Operator(fd=slave, out=io.StringIO(), poll_s=0.01)
        assert not termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO)
        os.write(master, b" ")
        wait_until(lambda: op.estopped, "the e-stop key through the pty")
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(lambda: calls, "the previous handler")
        assert calls == [signal.SIGTERM]
        assert termios.tcgetattr(slave) == before
        assert signal.getsignal(signal.SIGTERM) is not op._on_sigterm  # the previous handler is back
        op.close()  # idempotent
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(master)
        os.close(slave)


# ---------------------------------------------------------------------- a real terminal (tmux)

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="install tmux (apt-get install tmux)")


class Pane:
    """A detached tmux session on its own server (its own socket: no user config, this process's env)."""

    def __init__(self, command: str):
        self.socket, self.name = f"o2o-test-{uuid.uuid4().hex[:8]}", "op"
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", self.name, "-x", "120", "-y", "30", command)
        self.socket_path = self._tmux("display-message", "-p", "#{socket_path}").strip()

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def text(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name)

    def expect(self, text: str, count: int = 1, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.text()
            if screen.count(text) >= count:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} (x{count}) did not appear; the pane shows:\n{screen}")
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        if self.socket_path:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)


@needs_tmux
def test_real_terminal_keys_estop_and_mode_restored_after_sigterm():
    demo = f"{sys.executable} -m o2o.robot.operator --demo --seconds 60"
    # sh -c, not an interactive shell: bash would restore the terminal itself after a job killed by a signal.
    pane = Pane(f"sh -c '{demo}; echo exit=$?; stty -a; sleep 60'")
    try:
        screen = pane.expect("waiting for the operator's reset key (g)")
        assert "keys: s success | f failure" in screen
        pid = int(screen.split("demo pid ")[1].split()[0])
        pane.keys("g")  # no Enter: cbreak mode
        pane.expect("episode 1 running")
        pane.keys("ss")  # a double press
        screen = pane.expect("counters ")
        assert "episode 1: success reward 1" in screen
        assert "'s' ignored: this episode already ended (success)" in screen
        assert "success=1" in screen and "repeated=1" in screen
        pane.keys("f")  # during the reset: dropped, never given to episode 2
        pane.expect("'f' ignored: no episode is running")
        pane.keys("g")
        pane.expect("episode 2 running")
        pane.keys("x")
        pane.expect("'x' is not an operator key")
        assert "episode 2:" not in pane.text()
        pane.keys("Space")
        pane.expect("episode 2 e-stopped: holding")
        pane.keys("n")  # a verdict key does not release the e-stop
        time.sleep(0.3)
        assert "episode 2 goes on" not in pane.text()
        pane.keys("g")
        pane.expect("episode 2 goes on")
        screen = pane.expect("episode 2: end_episode reward 0")  # the n pressed while e-stopped ends it
        assert "success=1 failure=0 end_episode=1" in screen and "estop=1" in screen
        os.kill(pid, signal.SIGTERM)
        screen = pane.expect("exit=143")  # died of SIGTERM, as a default handler would
        flags = screen.split("exit=143", 1)[1].replace(";", " ").split()
        assert "icanon" in flags and "echo" in flags, flags  # cbreak undone
        assert "-icanon" not in flags and "-echo" not in flags
    finally:
        pane.close()
