"""d3rlpy 2.8 CalQL side of benchmarks/calql_updates.py; runs in its own venv (d3rlpy pins gymnasium).

Reads the synthetic dataset from an .npz, builds CalQL with the benchmark's config,
prints one JSON line {"ready": ..., "gflop": ...}, then answers stdin commands:
  ``time <mode> <steps>``  ->  {"rate": updates/s}   (mode: update | loop)
  ``quit``
``update`` times ``algo.impl.update(torch_batch)`` on pre-converted mini-batches (the
whole real update: critic step, actor step, temperature step, target sync) with no
sampling; ``loop`` times what ``fit`` does per step: sample_transition_batch + algo.update
(numpy -> torch conversion and the per-sample return-to-go sum included).

``--pixels``: the .npz holds uint8 images (N, C, H, W) and the encoders are DrQ's, as ours
(benchmarks/pixel_calql_updates.py): conv 32 3x3 stride 2, three conv 32 3x3 stride 1, linear to 50,
LayerNorm, tanh, then the MLP (the critic's with the action concatenated after the features).
d3rlpy gives actor and critic each their own encoder and has no image augmentation (2.x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

# Everything d3rlpy/structlog prints goes to stderr; our JSON lines alone go to stdout.
_OUT = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import d3rlpy  # noqa: E402
from d3rlpy.dataset import MDPDataset  # noqa: E402
from d3rlpy.models.encoders import EncoderFactory, VectorEncoderFactory, register_encoder_factory  # noqa: E402
from d3rlpy.models.torch.encoders import Encoder, EncoderWithAction  # noqa: E402
from d3rlpy.torch_utility import TorchMiniBatch  # noqa: E402


def tune_malloc() -> None:
    """glibc: keep freed blocks up to 32 MB in the heap instead of unmapping them (no page faults)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


class DrQTrunk(torch.nn.Module):
    """DrQ's conv encoder + LayerNorm + tanh, then an MLP: the same shapes as o2o's ObsEncoder + MLP."""

    def __init__(self, shape, hidden: list[int], action_size: int = 0):
        super().__init__()
        c, h, w = shape
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(c, 32, 3, stride=2), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=1), torch.nn.ReLU(), torch.nn.Flatten())
        flat = self.conv(torch.zeros(1, c, h, w)).shape[1]
        self.head = torch.nn.Sequential(torch.nn.Linear(flat, 50), torch.nn.LayerNorm(50), torch.nn.Tanh())
        layers, width = [], 50 + action_size
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
            width = size
        self.mlp = torch.nn.Sequential(*layers)

    def forward(self, x, action=None):
        features = self.head(self.conv(x))
        return self.mlp(features if action is None else torch.cat([features, action], dim=1))


class DrQEncoder(Encoder):
    def __init__(self, shape, hidden: list[int]):
        super().__init__()
        self.trunk = DrQTrunk(shape, hidden)

    def forward(self, x):
        return self.trunk(x)


class DrQEncoderWithAction(EncoderWithAction):
    def __init__(self, shape, action_size: int, hidden: list[int]):
        super().__init__()
        self.trunk = DrQTrunk(shape, hidden, action_size)

    def forward(self, x, action):
        return self.trunk(x, action)


@dataclasses.dataclass()
class DrQEncoderFactory(EncoderFactory):
    hidden: list[int] = dataclasses.field(default_factory=lambda: [256, 256])

    def create(self, observation_shape):
        return DrQEncoder(observation_shape, self.hidden)

    def create_with_action(self, observation_shape, action_size: int, discrete_action: bool = False):
        return DrQEncoderWithAction(observation_shape, action_size, self.hidden)

    @staticmethod
    def get_type() -> str:
        return "o2o_drq"


register_encoder_factory(DrQEncoderFactory)


def say(**msg) -> None:
    _OUT.write(json.dumps(msg) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--critic-hidden", default="256,256")
    p.add_argument("--policy-hidden", default="256,256")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mallopt", action="store_true")
    p.add_argument("--pixels", action="store_true", help="image observations, DrQ encoders (see the docstring)")
    args = p.parse_args()
    if args.mallopt:
        tune_malloc()
    torch.set_num_threads(args.threads)
    d3rlpy.seed(args.seed)
    device = "cuda:0" if args.device.startswith("cuda") else "cpu:0"

    d = np.load(args.data)
    dataset = MDPDataset(
        observations=d["obs"], actions=d["action"], rewards=d["reward"],
        terminals=d["terminal"], timeouts=d["timeout"],
    )
    hidden = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    if args.pixels:
        encoder = lambda s: DrQEncoderFactory(hidden(s))  # noqa: E731
    else:
        encoder = lambda s: VectorEncoderFactory(hidden_units=hidden(s))  # noqa: E731
    config = d3rlpy.algos.CalQLConfig(
        batch_size=args.batch,
        gamma=0.99,
        tau=5e-3,
        actor_learning_rate=1e-4,
        critic_learning_rate=3e-4,
        temp_learning_rate=1e-4,  # auto entropy (target -|A|)
        initial_temperature=1.0,
        alpha_learning_rate=0.0,  # no Lagrange: CQL weight fixed at initial_alpha * conservative_weight
        initial_alpha=1.0,
        conservative_weight=5.0,
        n_action_samples=10,
        max_q_backup=True,
        soft_q_backup=False,
        n_critics=2,
        actor_encoder_factory=encoder(args.policy_hidden),
        critic_encoder_factory=encoder(args.critic_hidden),
        observation_scaler=d3rlpy.preprocessing.PixelObservationScaler() if args.pixels else None,
        compile_graph=False,
    )
    algo = config.create(device=device)
    algo.build_with_dataset(dataset)
    impl = algo.impl

    def torch_batch() -> TorchMiniBatch:
        return TorchMiniBatch.from_batch(
            batch=dataset.sample_transition_batch(args.batch), gamma=config.gamma,
            compute_returns_to_go=algo.need_returns_to_go, device=device,
        )

    pool = [torch_batch() for _ in range(16)]
    step = [0]

    def update() -> None:
        impl.update(pool[step[0] % len(pool)], step[0])
        step[0] += 1

    def loop() -> None:
        algo.update(dataset.sample_transition_batch(args.batch))

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(1 if args.pixels else 5):  # a pixel update takes minutes on a CPU
        update()
    sync()
    with FlopCounterMode(display=False) as counter:
        update()
    say(ready=True, gflop=counter.get_total_flops() / 1e9, torch=torch.__version__,
        d3rlpy=d3rlpy.__version__, threads=torch.get_num_threads())

    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        fn, steps = {"update": update, "loop": loop}[cmd[1]], int(cmd[2])
        fn()  # one untimed step: the block starts warm
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        say(rate=steps / (time.perf_counter() - t0))


if __name__ == "__main__":
    main()
