"""A ``SimArm`` that writes what happens to it to a journal file (one JSON line per call), so a test can see
from outside an ``o2o-actor`` process every action that reached the "hardware", and how it was left.

    o2o-actor task=arm-reach robot.type=arm_journal:JournalArm 'robot.options={journal:/tmp/j.jsonl}' ...
"""

from __future__ import annotations

import json
import math

from o2o.robot.sim_arm import JOINTS, SimArm


class JournalArm(SimArm):
    def __init__(self, journal: str, **kwargs):
        super().__init__(**kwargs)
        self.journal = open(journal, "a", buffering=1)  # line-buffered: a killed process loses no line

    def _write(self, op: str, **fields) -> None:
        self.journal.write(json.dumps({"op": op, **fields}) + "\n")

    def measured(self) -> list[float]:
        return [math.degrees(self.data.qpos[a]) for a in self._qadr]

    def connect(self, calibrate: bool = True) -> None:
        super().connect(calibrate)
        self._write("connect")

    def send_action(self, action: dict) -> dict:
        before = self.measured()
        sent = super().send_action(action)
        self._write("send", action=[float(action[f"{j}.pos"]) for j in JOINTS], measured=before)
        return sent

    def disconnect(self) -> None:
        super().disconnect()
        self._write("disconnect")
