"""Build the actor's ``Robot`` from its settings (``robot.type=... robot.port=...``).

``settings["type"]`` picks the robot; the other keys are its settings:
- ``"o2o_sim_arm"``: ``sim_arm.SimArm(**rest)``, the MuJoCo arm that stands in for hardware;
- ``"package.module:ClassName"``: any class with LeRobot's ``Robot`` interface (``seams.Robot``),
  built as ``ClassName(**rest)``;
- any other type: a LeRobot robot (``so101_follower``, ``koch_follower``, a ``lerobot_robot_*``
  plugin...): its config class is the one LeRobot registered under that type, built from ``rest``
  (``cameras`` as ``{name: {"type": "opencv", ...}}``), then ``lerobot.robots.make_robot_from_config``.

``lerobot`` is imported here only, and only for that last case: it pins torch<2.11 and pulls in
torch, torchvision, datasets, accelerate, av and einops (issue 21), so it lives on the robot's
machine and never in the learner's environment.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import pkgutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .seams import Robot

log = logging.getLogger(__name__)

SIM_ARM = "o2o_sim_arm"
LEROBOT_PIN = "lerobot==0.4.4"
# The members of seams.Robot (LeRobot's interface), to name the missing ones.
ROBOT_MEMBERS = ("observation_features", "action_features", "is_connected", "connect",
                 "get_observation", "send_action", "disconnect")


def make_robot(settings: Mapping[str, Any]) -> Robot:
    """The robot ``settings["type"]`` names, built from the other keys (see the module doc)."""
    rest = _plain(settings)
    kind = rest.pop("type", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"robot.type is required: {SIM_ARM}, a LeRobot robot type (so101_follower...) "
                         f"or package.module:ClassName; got {kind!r}")
    if kind == SIM_ARM:
        from .sim_arm import SimArm  # lazily: MuJoCo is only loaded for the sim arm

        return _build(kind, SimArm, rest)
    if ":" in kind:
        return _from_import_path(kind, rest)
    return _lerobot_robot(kind, rest)


def _build(kind: str, cls: type, rest: dict[str, Any]) -> Any:
    try:
        return cls(**rest)
    except TypeError as e:  # an unknown or missing keyword: say which robot.* setting
        raise TypeError(f"robot.type={kind}: {e}") from e


def missing_members(robot: Any) -> list[str]:
    """The ``seams.Robot`` members ``robot`` lacks (looked up without calling its properties)."""
    missing = []
    for name in ROBOT_MEMBERS:
        try:
            inspect.getattr_static(robot, name)
        except AttributeError:
            missing.append(name)
    return missing


def _from_import_path(path: str, rest: dict[str, Any]) -> Robot:
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"robot.type={path}: cannot import {class_name} from {module_name}: {e}") from e
    robot = _build(path, cls, rest)
    missing = missing_members(robot)
    if missing:
        raise TypeError(f"robot.type={path}: {class_name} lacks LeRobot's Robot interface: "
                        f"missing {', '.join(missing)} (see o2o.robot.seams.Robot)")
    return robot


def _lerobot_robot(kind: str, rest: dict[str, Any]) -> Robot:
    config = lerobot_config(kind, rest)
    from lerobot.robots import make_robot_from_config

    try:
        return make_robot_from_config(config)
    except ModuleNotFoundError as e:  # a motor or camera SDK that is a LeRobot extra (scservo_sdk: feetech)
        raise ImportError(f"robot.type={kind} needs the module {e.name}, which is not installed: install the "
                          f"LeRobot extra for its motors or cameras (an SO-100/SO-101: pip install "
                          f"'lerobot[feetech]=={LEROBOT_PIN.split('==')[1]}')") from e


def make_teleoperator(settings: Mapping[str, Any]) -> Any:
    """A LeRobot teleoperator for the operator's takeover (``arm.teleop=so101_leader``, ``koch_leader``,
    ``gamepad``...; its keys from ``arm.teleop_options``), built as LeRobot robots are (``lerobot`` imported here)."""
    rest = _plain(settings)
    kind = rest.pop("type")
    config = lerobot_config(kind, rest, family="teleoperator")
    from lerobot.teleoperators import make_teleoperator_from_config

    return make_teleoperator_from_config(config)


def lerobot_config(kind: str, settings: Mapping[str, Any], family: str = "robot") -> Any:
    """The LeRobot config registered under ``kind`` (a ``RobotConfig``, or with ``family="teleoperator"`` a
    ``TeleoperatorConfig``), built from ``settings`` (no hardware is touched)."""
    key = "robot.type" if family == "robot" else "arm.teleop"
    if importlib.util.find_spec("lerobot") is None:
        raise ImportError(
            f"{key}={kind} is a LeRobot {family}: install lerobot on the robot's machine "
            f"(pip install {LEROBOT_PIN}: it pins torch<2.11, keep it out of the learner's environment)")
    _check_datasets_not_shadowed()
    import draccus  # LeRobot's config library (its dependency)

    if family == "robot":
        from lerobot.robots import RobotConfig as base
    else:
        from lerobot.teleoperators import TeleoperatorConfig as base

    settings = _plain(settings)
    failed = _register_lerobot_choices()
    try:
        config_cls = base.get_choice_class(kind)
    except KeyError:
        known = ", ".join(sorted(base.get_known_choices()))
        note = f" (these failed to import: {', '.join(failed)})" if failed else ""
        own = "robot.type=package.module:ClassName" if family == "robot" else "a lerobot_teleoperator_* package"
        raise ValueError(f"{key}={kind}: no LeRobot {family} of that type; known types: {known}{note}. One "
                         f"of your own: a lerobot_{family}_* package, or {own}") from None
    try:
        # draccus builds the nested camera configs ({"type": "opencv", ...}) and converts
        # values to the fields' types (a path, an enum), as LeRobot's own command line does.
        return draccus.decode(config_cls, settings)
    except Exception as e:  # draccus's DecodingError, or its ParsingError over the config's own ValueError
        fields = ", ".join(f.name for f in dataclasses.fields(config_cls))
        raise ValueError(f"{key}={kind}: {_reason(e)}; {config_cls.__name__} takes: {fields}") from e


def _check_datasets_not_shadowed() -> None:
    """LeRobot imports Hugging Face's ``datasets``; run from o2o's source folder (``python -m``/``-c`` put the
    current folder first on sys.path), o2o's own top-level ``datasets/`` folder would be found instead."""
    spec = importlib.util.find_spec("datasets")
    ours = Path(__file__).resolve().parents[1] / "datasets"
    if spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == ours:
        raise ImportError(f"LeRobot needs Hugging Face's datasets, but o2o's own folder {ours} is found first "
                          f"(this process runs from o2o's source folder): start the actor with o2o-actor, "
                          f"or from another folder")


def _register_lerobot_choices() -> list[str]:
    """Import LeRobot's robot and camera packages and its ``lerobot_robot_*`` plugins: a config class
    is registered under its type only once its module is imported (LeRobot's own scripts import
    them all, e.g. lerobot/scripts/lerobot_record.py). Returns the modules that failed to import."""
    import lerobot.cameras
    import lerobot.robots
    import lerobot.teleoperators
    from lerobot.utils.import_utils import register_third_party_plugins

    failed = []
    for package in (lerobot.robots, lerobot.cameras, lerobot.teleoperators):
        for module in pkgutil.iter_modules(package.__path__):
            if module.ispkg:
                name = f"{package.__name__}.{module.name}"
                try:
                    importlib.import_module(name)
                except Exception as e:  # one robot's missing SDK must not hide the others
                    log.debug("could not import %s: %s", name, e)
                    failed.append(name)
    register_third_party_plugins()
    return failed


def _reason(error: BaseException) -> str:
    """Why draccus refused the settings: its ParsingError says only "Couldn't instantiate class X" and
    keeps the config's own ValueError ("Specifying 'fps' is required...") as its context."""
    inner = error.__cause__ or error.__context__
    if type(error).__name__ == "ParsingError" and inner is not None:
        return str(inner)
    return str(error)


def _plain(value: Any) -> Any:
    """Nested mappings and lists as plain dicts and lists (Hydra hands over DictConfig / ListConfig)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value
