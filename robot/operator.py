"""The operator at the actor's terminal: single keys -> the events of robot/seams.py, and a keyboard teleoperator.

Keys (no Enter needed on a terminal):

    s success · f failure · n end episode · space E-STOP · g go (reset done / release the e-stop) · h takeover

``KeyboardTeleop``'s keys move joint i up (1 2 3 ... 0) or down (q w e ... p): the column is the joint, so no
operator key sits among them. One terminal, one reader: the ``Operator`` reads every key and hands the
teleoperator's keys to it while the operator has taken over.

A key pressed twice never gives a silent wrong verdict:
- a verdict key (s/f/n) is accepted once per episode; a second one is counted ``repeated`` and dropped (the
  first verdict stands), and the terminal says so;
- verdict keys while no episode runs (during a reset) are counted ``ignored`` and dropped, so they never
  land on the next episode; ``begin_episode`` drops (and counts) any verdict the judge did not collect;
- g confirms only a wait that is running (``wait_for``); a g pressed while nothing waits is ``ignored``, so an
  early or double g never skips the next reset. A g while e-stopped is the release only: confirming a reset
  takes another g.

The terminal. On a TTY the reader puts it in cbreak mode (no echo, no Enter; Ctrl-C still interrupts) and
restores the previous mode at ``close()``, at exit (atexit) and on SIGTERM (a handler that restores the mode,
then runs the handler that was there before, or dies of SIGTERM as before). Only SIGKILL leaves the terminal
in cbreak mode: ``stty sane`` repairs it. When the input is not a TTY (a test harness, a pipe) the keys are
read as they come, so a line "s<Enter>" is the key s (newlines are skipped); this is said once at start. When
the input is closed or missing (nohup, /dev/null) or the process runs in the background, no key can ever
come: that is said once, and ``wait_for`` raises ``OperatorUnavailable`` instead of waiting forever.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from .seams import END_EPISODE, ESTOP, FAILURE, RESUME, SUCCESS, TAKEOVER

KEYS = {"s": SUCCESS, "f": FAILURE, "n": END_EPISODE, " ": ESTOP, "g": RESUME, "h": TAKEOVER}
VERDICTS = (SUCCESS, FAILURE, END_EPISODE)
RESET_KEY = "g"
SHORT_HELP = "s f n space g h"
HELP = "keys: s success | f failure | n end episode | space E-STOP | g go (reset done / release e-stop) | h takeover"


class OperatorUnavailable(RuntimeError):
    """The operator's keys cannot arrive (the input is closed, or the process runs in the background)."""


class Operator:
    """Reads the operator's keys on a thread; ``events()`` for the judge, ``wait_for`` for resets,
    ``estopped`` and ``takeover`` for the env. ``fd``: the terminal (default: stdin); ``out``: where it talks."""

    def __init__(self, fd: int | None = None, out: TextIO | None = None, poll_s: float = 0.05):
        self.out = out if out is not None else sys.stderr
        self.poll_s = poll_s
        self.estopped = False
        """Latched by the e-stop key; released only by g."""
        self.takeover = False
        """Toggled by h: the teleoperator's action replaces the policy's."""
        self.counters = dict.fromkeys(("keys", "unknown", "repeated", "ignored", *VERDICTS, ESTOP, RESUME, TAKEOVER), 0)
        """keys read; unknown keys; repeated (a second verdict or e-stop); ignored (keys that came when
        nothing takes them: between episodes, a g with nothing waiting, a joint key without takeover);
        verdicts the judge collected; e-stops latched; g confirmations; takeovers begun."""
        self.teleop: KeyboardTeleop | None = None
        self.closed_input: str | None = None
        """Why no key can arrive any more (None while keys can come)."""
        self._changed = threading.Condition()
        self._seen = dict.fromkeys(KEYS.values(), 0)  # accepted occurrences per event, for wait_for
        self._releases = 0
        self._verdicts: list[str] = []  # accepted, not yet collected by the judge
        self._phase = "between"  # "running" -> (a verdict) "decided" -> (close_episode) "between" -> ...
        self._decided: str | None = None
        self._waiting = 0  # wait_for calls running
        self._closed = False
        self._saved: list | None = None  # the terminal's mode before cbreak
        self._previous_sigterm: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fd = fd if fd is not None else _stdin_fd()
        self.say(HELP)
        if self.fd is None:
            self._input_gone("stdin is closed")
            return
        if os.isatty(self.fd):
            if _in_background(self.fd):  # reading or setting the mode would stop us (SIGTTIN/SIGTTOU)
                self._input_gone("this process runs in the background of its terminal (bring it to the foreground)")
                return
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd, termios.TCSANOW)
            atexit.register(self.close)
            self._catch_sigterm()
        else:
            self.say("the input is not a terminal: keys are read as they come (type s then Enter); newlines skipped")
        self._thread = threading.Thread(target=self._read, name="o2o-operator-keys", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ for the judge, the env, the resets

    def say(self, message: str) -> None:
        """One line on the operator's terminal."""
        print(f"[operator] {message}", file=self.out, flush=True)

    def begin_episode(self) -> None:
        """An episode starts: verdict keys count from now; any verdict the judge did not collect is dropped."""
        with self._changed:
            self._drop_uncollected()
            self._phase, self._decided = "running", None

    def close_episode(self) -> None:
        """No episode runs (a reset started): verdict keys are ignored until ``begin_episode``."""
        with self._changed:
            self._drop_uncollected()
            self._phase = "between"

    def events(self) -> list[str]:
        """The verdicts (success / failure / end_episode) accepted since the last call: at most one an episode."""
        with self._changed:
            taken, self._verdicts = self._verdicts, []
            for event in taken:
                self.counters[event] += 1
            return taken

    def wait_for(self, event: str, hold: Callable[[], None], should_stop: Callable[[], bool],
                 every_s: float = 0.1) -> bool:  # fmt: skip
        """Block until ``event`` happens after this call, calling ``hold()`` every ``every_s`` meanwhile
        (the arm keeps still); False once ``should_stop()`` or once the operator is closed (the process is
        stopping: SIGTERM closes it). ``wait_for(RESUME)`` begun while e-stopped returns at the release; begun
        while not e-stopped, it needs a g that is not a release. The input closed: ``OperatorUnavailable``."""
        with self._changed:
            start, releases, was_estopped = self._seen[event], self._releases, self.estopped
            self._waiting += 1
        try:
            while True:
                with self._changed:
                    if self._seen[event] > start or (event == RESUME and was_estopped and self._releases > releases):
                        return True
                    if self._closed:
                        return False
                    if self.closed_input is not None:
                        raise OperatorUnavailable(f"waiting for {event}, but no key can arrive: {self.closed_input}")
                if should_stop():
                    return False
                hold()
                with self._changed:
                    self._changed.wait(every_s)
        finally:
            with self._changed:
                self._waiting -= 1

    def attach_teleop(self, teleop: KeyboardTeleop) -> None:
        """Hand ``teleop``'s keys to it while the operator has taken over."""
        clash = sorted(set(teleop.keys) & set(KEYS))
        if clash:
            raise ValueError(f"teleop keys {clash} are operator keys ({HELP})")
        self.teleop = teleop
        self.say(f"after h (takeover): {teleop.help()}")

    def close(self) -> None:
        """Stop reading and restore the terminal's mode; idempotent (atexit and SIGTERM call it too)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except termios.error:  # the terminal is gone: nothing to restore
                pass
            atexit.unregister(self.close)
            if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
                if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                    signal.signal(signal.SIGTERM, self._previous_sigterm)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ the reader

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], self.poll_s)
                data = os.read(self.fd, 64) if ready else None
            except OSError:  # the terminal hung up (EIO) or the fd was closed
                data = b""
            if data is None:
                continue
            if not data:
                self._input_gone("the input closed (end of file)")
                return
            for key in split_keys(data.decode("utf-8", "replace")):
                self._on_key(key)

    def _on_key(self, key: str) -> None:
        with self._changed:
            self.counters["keys"] += 1
            teleop = self.teleop
            if teleop is not None and key in teleop.keys:
                if self.takeover:
                    teleop.press(key)
                else:
                    self.counters["ignored"] += 1
                    self.say(f"{key!r} moves a joint only after a takeover (h): ignored")
            elif key not in KEYS:
                self.counters["unknown"] += 1
                self.say(f"{key!r} is not an operator key: ignored (they are {SHORT_HELP})")
            elif KEYS[key] in VERDICTS:
                self._verdict(KEYS[key], key)
            elif KEYS[key] == ESTOP:
                self._estop()
            elif KEYS[key] == RESUME:
                self._resume()
            else:
                self._toggle_takeover()
            self._changed.notify_all()

    def _verdict(self, event: str, key: str) -> None:
        if self._phase == "running":
            self._verdicts.append(event)
            self._phase, self._decided = "decided", event
            self._seen[event] += 1
            self.say(f"{event}: the episode ends")
        elif self._phase == "decided":
            self.counters["repeated"] += 1
            self.say(f"{key!r} ignored: this episode already ended ({self._decided})")
        else:
            self.counters["ignored"] += 1
            self.say(f"{key!r} ignored: no episode is running (a reset is under way)")

    def _estop(self) -> None:
        if self.estopped:
            self.counters["repeated"] += 1
            self.say("E-STOP already latched: press g to release")
            return
        self.estopped = True
        self.counters[ESTOP] += 1
        self._seen[ESTOP] += 1
        self.say("E-STOP: the arm is held; press g to release")

    def _resume(self) -> None:
        if self.estopped:
            self.estopped = False
            self._releases += 1
            self.say("e-stop released")
        elif self._waiting:
            self.counters[RESUME] += 1
            self._seen[RESUME] += 1
            self.say("go")
        else:
            self.counters["ignored"] += 1
            self.say("'g' ignored: nothing waits for it now")

    def _toggle_takeover(self) -> None:
        self.takeover = not self.takeover
        self._seen[TAKEOVER] += 1
        if self.takeover:
            self.counters[TAKEOVER] += 1
            if self.teleop is not None:
                self.teleop.sync()  # start from where the arm is, not from the last takeover's targets
        self.say(f"takeover {'ON: the keyboard drives the arm' if self.takeover else 'off: the policy drives'}")

    def _drop_uncollected(self) -> None:
        for event in self._verdicts:  # e.g. a key that came as the episode hit its time limit
            self.counters["ignored"] += 1
            self.say(f"{event} came after the episode had ended: dropped")
        self._verdicts = []

    def _input_gone(self, why: str) -> None:
        with self._changed:
            if self.closed_input is None:
                self.closed_input = why
                self.say(f"no operator keys: {why}")
            self._changed.notify_all()

    def _catch_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; atexit and close() still restore the terminal
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN or previous is None:
            return
        self._previous_sigterm = previous
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        previous = self._previous_sigterm
        self.close()  # restores the terminal and the previous handler
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL: die of SIGTERM as before, with the terminal restored
            os.kill(os.getpid(), signum)


def split_keys(text: str) -> list[str]:
    """The keys in ``text``: one character each, an escape sequence (an arrow key) as one key, newlines dropped."""
    keys, i = [], 0
    while i < len(text):
        if text[i] == "\x1b" and i + 1 < len(text):
            j = i + 2
            if text[i + 1] in "[O":  # CSI / SS3: runs to a final byte in @..~
                while j < len(text) and not "@" <= text[j] <= "~":
                    j += 1
                j += 1
            keys.append(text[i:j])
            i = j
            continue
        if text[i] not in "\r\n":
            keys.append(text[i])
        i += 1
    return keys


def _in_background(fd: int) -> bool:
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:  # not our controlling terminal (a pty of our own): no job control on it
        return False


def _stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno() if sys.stdin is not None else None
    except (ValueError, OSError):  # closed, or not a real file
        return None


class KeyboardTeleop:
    """A ``Teleoperator`` (robot/seams.py) on the keyboard: key ``up_keys[i]`` / ``down_keys[i]`` moves action
    feature i's target by +-``step``. Targets start from the arm's measured positions (``measured()``: a vector
    in ``features`` order, or {feature: value}), read again at each takeover, never from the key thread."""

    def __init__(self, features: Sequence[str], measured: Callable[[], Any], step: float, *,
                 operator: Operator | None = None, up_keys: str = "1234567890",
                 down_keys: str = "qwertyuiop"):  # fmt: skip
        self.features = list(features)
        if len(self.features) > min(len(up_keys), len(down_keys)):
            raise ValueError(f"{len(self.features)} joints, but keys for only {min(len(up_keys), len(down_keys))}")
        if not step > 0:
            raise ValueError(f"step must be > 0, got {step}")
        self.measured, self.step = measured, float(step)
        self.keys = {k: (i, +1) for i, k in enumerate(up_keys[: len(self.features)])}
        self.keys.update({k: (i, -1) for i, k in enumerate(down_keys[: len(self.features)])})
        self._lock = threading.Lock()
        self._target: np.ndarray | None = None
        self._pending = np.zeros(len(self.features))
        self.connected = False
        if operator is not None:
            operator.attach_teleop(self)

    @property
    def action_features(self) -> dict[str, Any]:
        return dict.fromkeys(self.features, float)

    def help(self) -> str:
        by_joint = {name: ["", ""] for name in self.features}
        for key, (joint, sign) in self.keys.items():
            by_joint[self.features[joint]][sign < 0] = key
        return ", ".join(f"{name} {up}+ {down}-" for name, (up, down) in by_joint.items())

    def connect(self, calibrate: bool = True) -> None:
        self.connected = True

    def disconnect(self) -> None:
        self.connected = False

    def press(self, key: str) -> bool:
        """Move one joint's target (applied at the next ``get_action``); False for a key not its own."""
        if key not in self.keys:
            return False
        joint, sign = self.keys[key]
        with self._lock:
            self._pending[joint] += sign * self.step
        return True

    def sync(self) -> None:
        """The next ``get_action`` starts again from the measured positions (keys pressed since are kept)."""
        with self._lock:
            self._target = None

    def get_action(self) -> dict[str, float]:
        with self._lock:
            target, pending = self._target, self._pending
            self._pending = np.zeros(len(self.features))
        if target is None:
            target = self._measured_vector()
        target = target + pending
        with self._lock:
            self._target = target
        return {name: float(x) for name, x in zip(self.features, target)}

    def _measured_vector(self) -> np.ndarray:
        got = self.measured()
        if isinstance(got, Mapping):
            return np.array([float(got[name]) for name in self.features])
        vector = np.asarray(got, np.float64).reshape(-1)
        if vector.shape != (len(self.features),):
            raise ValueError(f"measured() gave {vector.size} values for {len(self.features)} joints {self.features}")
        return vector


# ---------------------------------------------------------------------- a demo for a real terminal (and its tests)


class _DemoArm:
    """Stands still: what ``OperatorReset`` holds while the demo waits for g."""

    def __init__(self):
        self.holds = 0

    def hold(self) -> None:
        self.holds += 1


def demo(seconds: float) -> int:
    """Episodes judged by the keys, each started by g, for ``seconds``: ``python -m o2o.robot.operator --demo``."""
    import logging

    from .keys_judge import KeysJudge
    from .reset import OperatorReset

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    operator = Operator(out=sys.stdout)
    judge, reset, arm = KeysJudge(operator, reward_success=1.0), OperatorReset(operator), _DemoArm()
    print(f"demo pid {os.getpid()}", flush=True)
    end, episode = time.monotonic() + seconds, 0
    try:
        while time.monotonic() < end:
            reset.reset(arm)
            judge.begin_episode()
            episode += 1
            print(f"episode {episode} running", flush=True)
            while time.monotonic() < end:
                if operator.estopped:
                    print(f"episode {episode} e-stopped: holding", flush=True)
                    operator.wait_for(RESUME, arm.hold, lambda: time.monotonic() > end)
                    print(f"episode {episode} goes on", flush=True)
                verdict = judge.judge(np.zeros(1, np.float32), {})
                if verdict.terminated or verdict.truncated:
                    outcome = "success" if verdict.success else "failure" if verdict.terminated else "end_episode"
                    print(f"episode {episode}: {outcome} reward {verdict.reward:g}", flush=True)
                    counts = " ".join(f"{k}={v}" for k, v in operator.counters.items())
                    print(f"counters {counts}", flush=True)
                    break
                time.sleep(0.05)
    except KeyboardInterrupt:
        return 130
    finally:
        operator.close()
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=demo.__doc__)
    parser.add_argument("--demo", action="store_true", help="run the key demo in this terminal")
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    if not args.demo:
        parser.error("nothing to do: pass --demo")
    sys.exit(demo(args.seconds))
