"""`o2o-status`: the fleet at a glance, in a terminal (over SSH, in tmux): what the learner publishes.

    o2o-status runs/online/pusher/<time>            # a learner's run folder, or an o2o-launch run folder
    o2o-status RUN --once                           # one frame, then exit (for scripts): 1 if no status yet

Reads ``<run>/status.json`` (learner/status_file.py, replaced atomically about once a second) and redraws
a plain-text table in place (ANSI home + clear to end of line/screen: no curses), at most 100 columns:
the learner's block (state, updates/s, buffer and store rows, policy version, last checkpoint, last
retrain) and one row per actor (state, steps/s, policy version and lag, spool depth, episodes,
successes, interventions, last contact). A missing or unreadable file is said and retried; a file
older than ``STALE_S`` is shown as stale with its age (the learner may be gone). No torch here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

STATUS_FILE = "status.json"  # learner/status_file.py STATUS_FILE (not imported: that package pulls in torch)
STALE_S = 5.0  # the learner writes every second: older than this, it may be gone
WIDTH = 100
COLUMNS = (("ACTOR", 13, "<"), ("STATE", 18, "<"), ("STEPS/S", 8, ">"), ("POLICY", 7, ">"), ("LAG", 4, ">"),
           ("SPOOL", 6, ">"), ("EPISODES", 8, ">"), ("SUCCESS", 11, ">"), ("INTERV", 7, ">"),
           ("CONTACT", 8, ">"))  # fmt: skip
"""(title, width, alignment): 99 columns with the spaces between them."""
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


def status_path(path: Path) -> Path:
    """The status file of a run folder: the learner's own, or the learner's under an o2o-launch folder
    (the same folder, unless the launch resumed a learner elsewhere: its ``learner.resume``)."""
    if path.is_file() or path.name == STATUS_FILE:
        return path
    launch_cfg = path / ".hydra" / "launch" / "config.yaml"  # o2o-launch keeps its own config there
    if not (path / STATUS_FILE).exists() and launch_cfg.is_file():
        try:
            resume = (yaml.safe_load(launch_cfg.read_text()) or {}).get("learner", {}).get("resume")
        except (OSError, yaml.YAMLError):
            resume = None
        if resume:
            resumed = Path(resume)
            return (resumed if resumed.is_dir() else resumed.parent) / STATUS_FILE
    return path / STATUS_FILE


def read_status(path: Path) -> tuple[dict | None, str | None]:
    """The status document, or None and why not."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no {path.name} yet: waiting for the learner to write it (it does once it starts)"
    except (OSError, ValueError) as err:
        return None, f"{path.name} is unreadable ({err}): retrying"
    if not isinstance(document, dict) or not isinstance(document.get("learner"), dict):
        return None, f"{path.name} is not an o2o status file: retrying"
    return document, None


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.0f}m" if seconds < 3600 else f"{seconds / 3600:.1f}h"


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 2] + ".."


def learner_lines(document: dict, now: float) -> list[str]:
    learner, age = document["learner"], now - document.get("time", now)
    state = learner.get("state", "?")
    if state == "pretraining":
        fresh = f"since {ago(age)} ago (progress: pretrain/metrics.jsonl)"
    elif age > STALE_S and state != "stopped":
        fresh = f"STALE: written {ago(age)} ago, is the learner running?"
    else:
        fresh = f"written {ago(age)} ago"
    lines = [f"learner  {state}  ({fresh})"]
    if "updates" in learner:
        held = "  FLEET HELD" if learner.get("holding") else ""
        lines.append(f"  updates {learner['updates']} ({learner.get('updates_per_s', 0):.1f}/s)  policy v"
                     f"{learner.get('policy_version')}  buffer {learner.get('buffer_rows')} rows  store "
                     f"{learner.get('store_rows')} rows{held}")  # fmt: skip
        checkpoint, retrain, running = learner.get("last_checkpoint"), learner.get("last_retrain"), learner.get("retraining")
        saved = f"update {checkpoint['updates']} ({ago(now - checkpoint['time'])} ago)" if checkpoint else "none yet"
        if retrain:
            taken = "switched in" if retrain.get("switched_in") else "finished"
            retrained = f"from update {retrain['updates']}, {taken} {ago(now - retrain['time'])} ago"
        else:
            retrained = "none"
        if running:
            retrained += f"; one running since update {running['updates']}"
        lines.append(f"  last checkpoint {saved}  last retrain {retrained}")
    return lines


def actor_line(actor_id: str, actor: dict) -> list[str]:
    """One actor's row (and a second line saying what it waits for, if anything)."""
    def number(key: str, fmt: str = "{}") -> str:
        value = actor.get(key)
        return "-" if value is None else fmt.format(value)

    version = actor.get("policy_version")
    episodes, successes = actor.get("episodes"), actor.get("successes")
    success = "-" if successes is None else (f"{successes} ({successes / episodes:.0%})" if episodes else str(successes))
    cells = [actor_id, actor.get("state") or "-", number("steps_per_s", "{:.1f}"),
             "-" if version is None or version < 0 else f"v{version}", number("policy_lag"), number("spool_depth"),
             number("episodes"), success, number("interventions"), ago(actor.get("since_contact_s"))]  # fmt: skip
    line = " ".join(f"{fit(str(cell), width):{align}{width}}" for cell, (_, width, align) in zip(cells, COLUMNS))
    lines = [line.rstrip()]
    notes = []
    if actor.get("waiting_for"):
        notes.append(f"waiting for: {actor['waiting_for']}")
    if actor.get("state") == "gone" and actor.get("last_state"):
        notes.append(f"last reported: {actor['last_state']}")
    refused = actor.get("refused")
    if refused and actor.get("state") != "refused":
        notes.append(f"a hello with this id was refused: {refused['reason']}")
    lines += [fit(f"    {note}", WIDTH) for note in notes]
    return lines


def render(document: dict | None, problem: str | None, path: Path, now: float) -> str:
    """One frame (lines of at most ``WIDTH`` characters)."""
    lines = [fit(f"o2o-status  {path}  {time.strftime('%H:%M:%S', time.localtime(now))}", WIDTH), ""]
    if document is None:
        return "\n".join(lines + [fit(problem or "", WIDTH)])
    lines += [fit(line, WIDTH) for line in learner_lines(document, now)]
    actors = document.get("actors") or {}
    lines += ["", " ".join(f"{title:{align}{width}}" for title, width, align in COLUMNS).rstrip()]
    for actor_id in sorted(actors):
        lines += actor_line(actor_id, actors[actor_id])
    if not actors:
        lines.append("(no actor has connected yet)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="o2o-status", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the learner's run folder, or an o2o-launch run folder")
    parser.add_argument("--once", action="store_true", help="print one frame and exit (exit 1 if no status yet)")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between refreshes (default 1.0)")
    args = parser.parse_args(argv)
    if args.every <= 0:
        parser.error("--every must be positive")
    try:
        while True:
            path = status_path(args.run_dir)  # looked up again: the learner's folder may appear later
            document, problem = read_status(path)
            frame = render(document, problem, path, time.time())
            if args.once:
                print(frame)
                return 0 if document is not None else 1
            # Home, each line cleared to its end, the rest of the screen cleared: redrawn in place, no flicker.
            sys.stdout.write(HOME + "".join(f"{line}{CLEAR_LINE}\n" for line in frame.splitlines()) + CLEAR_BELOW)
            sys.stdout.flush()
            time.sleep(args.every)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
