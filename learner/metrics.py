"""Metrics to a JSONL file and TensorBoard event files, one call per logging step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))

    def log(self, step: int, prefix: str, values: dict) -> dict:
        """Write ``prefix/key`` scalars at ``step``; tensors are read here, in one transfer."""
        names = list(values)
        tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
        host = torch.stack([t.float().reshape(()) for t in tensors]).tolist() if tensors else []
        it = iter(host)
        flat = {f"{prefix}/{k}": (next(it) if isinstance(values[k], torch.Tensor) else float(values[k])) for k in names}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **flat}) + "\n")
        if self._tb is not None:
            for key, value in flat.items():
                self._tb.add_scalar(key, value, step)
        return flat

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class RunningMean:
    """Sums metric tensors on their device between logging steps (no host sync per update)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def pop(self) -> dict[str, torch.Tensor]:
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means
