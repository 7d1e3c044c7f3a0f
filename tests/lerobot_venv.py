"""A side venv with LeRobot 0.4.4 and o2o, for tests/test_lerobot_robot.py.

LeRobot pins ``torch<2.11`` (and torchvision, torchcodec, wandb, rerun-sdk, diffusers...), so it
can never share the learner's environment (torch 2.13): it gets its own venv under ``.bench/``,
as benchmarks/calql_updates.py does for d3rlpy. o2o goes in editable with its plain dependencies
(what a robot's machine runs), not the ``learner`` extra.

    python -m tests.lerobot_venv          # build once (cached), print the time and the size

The venv counts as built only once ``o2o-ready.json`` is written inside it, so a build cut off
half way is started again from scratch instead of being used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".bench" / "lerobot-venv"
READY = VENV / "o2o-ready.json"
LEROBOT = "lerobot[feetech]==0.4.4"  # feetech: the SO-100/SO-101's servo SDK, so the test builds a real SOFollower
ENV_VAR = "O2O_LEROBOT_PYTHON"
HOW_TO_BUILD = (
    f"build the LeRobot side venv with `python -m tests.lerobot_venv` (LeRobot 0.4.4 and its torch<2.11 pin "
    f"in {VENV}), or point {ENV_VAR} at a python that has lerobot and o2o installed"
)


def lerobot_python() -> Path | None:
    """The python to run LeRobot with: ``$O2O_LEROBOT_PYTHON``, else the built side venv's, else None."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    if READY.exists():
        return VENV / "bin" / "python"
    return None


def size_mb(path: Path) -> int:
    return int(subprocess.run(["du", "-sm", str(path)], check=True, capture_output=True, text=True).stdout.split()[0])


def ensure_venv() -> Path:
    """Build the venv if it is not built yet; return its python."""
    python = VENV / "bin" / "python"
    if READY.exists():
        return python
    if VENV.exists():  # a build cut off half way
        shutil.rmtree(VENV)
    t0 = time.monotonic()
    print(f"creating {VENV} ({LEROBOT}, then o2o editable)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # One resolve for both, so pip cannot pick an o2o dependency that LeRobot's pins refuse.
    subprocess.run([*pip, LEROBOT, "-e", str(REPO)], check=True)
    # Proves the two import side by side before the venv is declared ready. Not from the repo's root:
    # there o2o's top-level datasets/ folder would shadow Hugging Face's datasets, which LeRobot imports.
    check = "import lerobot.robots, torch, o2o.robot.seams; print(lerobot.__version__, torch.__version__)"
    versions = subprocess.run([str(python), "-c", check], check=True, capture_output=True, text=True,
                              cwd=VENV).stdout.split()
    took = time.monotonic() - t0
    info = {"lerobot": versions[0], "torch": versions[1], "build_s": round(took, 1),
            "size_mb": size_mb(VENV)}
    READY.write_text(json.dumps(info, indent=1) + "\n")
    return python


def main() -> None:
    python = ensure_venv()
    info = json.loads(READY.read_text())
    print(f"{python}: lerobot {info['lerobot']}, torch {info['torch']}, "
          f"built in {info['build_s'] / 60:.1f} min, {info['size_mb']} MB")


if __name__ == "__main__":
    main()
