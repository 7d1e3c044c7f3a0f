"""robot/make_robot.py: the actor's robot from ``robot.type=...`` settings, without importing LeRobot
unless the user names a LeRobot robot (LeRobot itself: tests/test_lerobot_robot.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from o2o.robot import seams
from o2o.robot.make_robot import ROBOT_MEMBERS, make_robot, missing_members

from lerobot_venv import HOW_TO_BUILD, lerobot_python

ARM_MODULE = textwrap.dedent('''
    class FullArm:
        """Every member of LeRobot's Robot interface; remembers its settings."""
        def __init__(self, port, cameras=None):
            self.port, self.cameras = port, cameras
            self.is_connected = False
        observation_features = {"j.pos": float}
        action_features = {"j.pos": float}
        def connect(self, calibrate=True): self.is_connected = True
        def get_observation(self): return {"j.pos": 0.0}
        def send_action(self, action): return action
        def disconnect(self): self.is_connected = False

    class HalfArm:
        """No send_action, no disconnect."""
        def __init__(self): self.is_connected = False
        observation_features = {"j.pos": float}
        action_features = {"j.pos": float}
        def connect(self, calibrate=True): pass
        def get_observation(self): return {"j.pos": 0.0}
''')


@pytest.fixture
def arm_module(tmp_path, monkeypatch):
    (tmp_path / "o2o_test_arms.py").write_text(ARM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "o2o_test_arms"
    sys.modules.pop("o2o_test_arms", None)


def test_import_path_builds_the_class_with_the_other_keys_as_plain_values(arm_module):
    # Hydra hands the actor a DictConfig: the class gets plain dicts, not OmegaConf nodes.
    settings = OmegaConf.create({"type": f"{arm_module}:FullArm", "port": "/dev/ttyACM0",
                                 "cameras": {"front": {"width": 640, "height": 480}}})
    robot = make_robot(settings)
    assert type(robot).__name__ == "FullArm"
    assert robot.port == "/dev/ttyACM0"
    assert type(robot.cameras) is dict and type(robot.cameras["front"]) is dict
    assert robot.cameras == {"front": {"width": 640, "height": 480}}


def test_import_path_without_the_robot_interface_names_the_missing_members(arm_module):
    with pytest.raises(TypeError, match=r"HalfArm lacks LeRobot's Robot interface: missing send_action, disconnect"):
        make_robot({"type": f"{arm_module}:HalfArm"})


def test_missing_members_looks_at_instance_attributes_without_calling_properties(arm_module):
    import o2o_test_arms

    assert missing_members(o2o_test_arms.FullArm("p")) == []  # is_connected is set in __init__
    assert missing_members(object()) == ["observation_features", "action_features", "is_connected", "connect",
                                         "get_observation", "send_action", "disconnect"]


def test_the_members_checked_are_the_robot_protocols():
    assert set(ROBOT_MEMBERS) == {name for name in vars(seams.Robot) if not name.startswith("_")}


def test_unknown_settings_name_the_robot_type(arm_module):
    with pytest.raises(TypeError, match=r"robot.type=o2o_test_arms:FullArm: .*unexpected keyword argument 'baud'"):
        make_robot({"type": f"{arm_module}:FullArm", "port": "p", "baud": 9600})
    pytest.importorskip("o2o.robot.sim_arm")
    with pytest.raises(TypeError, match=r"robot.type=o2o_sim_arm: .*unexpected keyword argument 'port'"):
        make_robot({"type": "o2o_sim_arm", "port": "/dev/ttyACM0"})


def test_bad_import_path_and_missing_type_are_clear_errors(arm_module):
    with pytest.raises(ValueError, match=r"robot.type=o2o_test_arms:NoSuchArm: cannot import NoSuchArm"):
        make_robot({"type": f"{arm_module}:NoSuchArm"})
    with pytest.raises(ValueError, match=r"cannot import Arm from no_such_module_xyz"):
        make_robot({"type": "no_such_module_xyz:Arm"})
    with pytest.raises(ValueError, match=r"robot.type is required"):
        make_robot({"port": "/dev/ttyACM0"})


@pytest.mark.skipif(importlib.util.find_spec("lerobot") is not None, reason="lerobot is installed here")
def test_lerobot_type_without_lerobot_says_how_to_install_it():
    with pytest.raises(ImportError) as e:
        make_robot({"type": "so101_follower", "port": "/dev/ttyACM0"})
    assert str(e.value) == ("robot.type=so101_follower is a LeRobot robot: install lerobot on the robot's machine "
                            "(pip install lerobot==0.4.4: it pins torch<2.11, keep it out of the learner's environment)")


# A `lerobot` package that kills the process when imported: any import of lerobot, direct or through
# another module, fails the child loudly.
TRIPWIRE = 'import sys\nsys.stderr.write("lerobot was imported\\n")\nsys.exit(17)\n'
NO_LEROBOT_CHILD = textwrap.dedent('''
    import sys
    import o2o.actor.main
    import o2o.robot.make_robot
    from o2o.robot.make_robot import make_robot
    robot = make_robot({"type": "o2o_sim_arm"})
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("lerobot", "torch", "draccus"))
    print("heavy:", heavy)
''')


def _run_without_lerobot(python: str, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "lerobot").mkdir(exist_ok=True)
    (tmp_path / "lerobot" / "__init__.py").write_text(TRIPWIRE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([python, "-c", NO_LEROBOT_CHILD], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_actor_and_sim_arm_never_import_lerobot(tmp_path):
    pytest.importorskip("o2o.robot.sim_arm")
    done = _run_without_lerobot(sys.executable, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "heavy: []"


def test_actor_and_sim_arm_never_import_lerobot_where_it_is_installed(tmp_path):
    # The LeRobot side venv (tests/lerobot_venv.py) has the real lerobot, torch and draccus: none load.
    pytest.importorskip("o2o.robot.sim_arm")
    python = lerobot_python()
    if python is None:
        pytest.skip(f"no LeRobot venv: {HOW_TO_BUILD}")
    done = subprocess.run([str(python), "-c", NO_LEROBOT_CHILD], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "heavy: []"


def test_tripwire_fires_when_lerobot_is_imported(tmp_path):
    # The check above is only worth something if importing lerobot does fail the child.
    (tmp_path / "lerobot").mkdir()
    (tmp_path / "lerobot" / "__init__.py").write_text(TRIPWIRE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", "import o2o.robot.make_robot; import lerobot"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 17 and "lerobot was imported" in done.stderr
