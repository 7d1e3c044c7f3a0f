"""Typed configuration schemas (Hydra structured configs): a typo or a wrong type fails at start-up.

Defaults are the settings every domain of the official Cal-QL code shares (gamma,
learning rates, tau, 10 CQL actions, max-target backup, ...), with the AntMaze
column's networks and CQL weight but none of its per-domain switches (no Lagrange,
rewards unscaled): the `small` preset and the `paper` preset's domain columns
(configs/paper_domain/) set those.

Fine-tuning (`o2o-learner pretrained=...`) takes the whole `algo` and `net` from the
checkpoint. Fields in ``DATA_FIELDS`` define the data and can never change there;
every other `algo` field may be changed for fine-tuning by an explicit override.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

from o2o.datasets.data_settings import DataSettings
from o2o.transport.config import IngestConfig


@dataclasses.dataclass
class NetworkConfig:
    policy_hidden: list[int] = field(default_factory=lambda: [256, 256])
    """Hidden widths of the policy MLP."""
    critic_hidden: list[int] = field(default_factory=lambda: [256, 256, 256, 256])
    """Hidden widths of each Q MLP."""
    num_critics: int = 2
    """Q networks in the ensemble (targets take the min over them)."""
    orthogonal_init: bool = True
    """Orthogonal weight init, as the official code (False: PyTorch's default init)."""
    log_std_multiplier: float = 1.0
    """Initial value of the policy's trainable log-std multiplier."""
    log_std_offset: float = -1.0
    """Initial value of the policy's trainable log-std offset."""
    normalize_observations: bool = False
    """Standardise observations with the offline data's mean/std (baked into the ONNX policy)."""
    critic_feature_norm: bool = False
    """L2-normalise each critic's penultimate features, x / max(||x||, 1e-8) (an OOO retraining option)."""
    rnd_hidden: list[int] = field(default_factory=lambda: [512, 512])
    """Hidden widths of the RND predictor and target (OOO's Cal-QL variant: 512-512)."""
    rnd_features: int = 512
    """Output width of the RND predictor and target (OOO: 512)."""


@dataclasses.dataclass
class CalQLConfig(DataSettings):
    """The agent: the data settings (``DataSettings``: discount, reward_scale, reward_bias,
    mc_infinite_horizon, declared there) and the algorithm's own."""

    calibrated: bool = True
    """Cal-QL: raise policy-action Q-values in the CQL term to the MC return. False = plain CQL."""
    policy_lr: float = 1e-4
    """Adam learning rate of the policy."""
    critic_lr: float = 3e-4
    """Adam learning rate of the Q networks."""
    alpha_lr: float = 1e-4
    """Learning rate of the entropy temperature (the official code uses the policy lr)."""
    alpha_prime_lr: float = 3e-4
    """Learning rate of the CQL Lagrange multiplier (the official code uses the Q lr)."""
    tau: float = 5e-3
    """Target network soft-update rate."""
    auto_entropy: bool = True
    """Tune the SAC temperature to reach target_entropy; off = fixed alpha_multiplier."""
    target_entropy: float | None = None
    """None = -action_dim."""
    alpha_multiplier: float = 1.0
    """Scales the SAC temperature (the fixed temperature when auto_entropy is off)."""
    backup_entropy: bool = False
    """Subtract alpha * log pi(a'|s') in the TD target."""
    cql_n_actions: int = 10
    """Policy and uniform actions sampled per state for the CQL term and the max-target backup."""
    cql_importance_sample: bool = True
    """Subtract the sampling log-density from each CQL action's Q-value (off for Kitchen)."""
    cql_lagrange: bool = False
    """Tune the CQL weight with a Lagrange multiplier towards cql_target_action_gap (on for AntMaze)."""
    cql_target_action_gap: float = 0.8
    """Target of the CQL gap with cql_lagrange."""
    cql_alpha: float = 5.0
    """CQL weight (min_q_weight): fixed weight, or the multiplier's scale with Lagrange. Set it for
    fine-tuning to change the weight online (the official cql_min_q_weight_online; 0 = SAC online)."""
    cql_temp: float = 1.0
    """Temperature of the CQL logsumexp."""
    cql_max_target_backup: bool = True
    """Backup the max over cql_n_actions next actions of min-Q (the official default)."""
    cql_clip_diff_min: float = -1e30
    """Lower clip of the CQL gap per critic (the official default: no clip)."""
    cql_clip_diff_max: float = 1e30
    """Upper clip of the CQL gap per critic (the official default: no clip)."""
    rnd: bool = field(default=False, metadata={"bonus": "o2o.learner.rnd:RND"})
    """RND novelty bonus in the TD target, y = r + rnd_coef * r_int + gamma (1 - d) Q' (OOO's exploring
    agent; learner/rnd.py). Trained from the first pretraining step on, so offline states are not novel."""
    rnd_coef: float = 10.0
    """beta of the RND bonus (OOO: 10 for mazes and Kitchen, 0.5 for Adroit binary, 50 for AntMaze with rewards x10)."""
    rnd_lr: float = 1e-4
    """Adam learning rate of the RND predictor (OOO: 1e-4)."""
    rnd_train_fraction: float = 0.25
    """Fraction of each batch the RND predictor trains on (OOO: a random 25%)."""
    sera: bool = field(default=False, metadata={"bonus": "o2o.learner.sera:SeraBonus"})
    """SERA bonus, r + sera_coef * r_int, from frozen copies of the pretrained critic and policy
    (learner/sera.py); fine-tuning only."""
    sera_coef: float = 1.0
    """lambda of the SERA bonus (the paper: 1)."""
    sera_k: int = 10
    """k of SERA's k-nearest-neighbour entropy estimate (the paper: 10-25 by task)."""
    sera_rows: str = "batch"
    """Rows the kNN runs over and the bonus goes to: batch (VCSE: the whole batch, offline rows
    included) or online (the online rows only; offline rows get 0)."""
    sera_center: bool = True
    """Subtract the bonus's mean over those rows: an exploration signal with no living reward (a raw
    bonus of ~+2 per step outweighs a {0, 1} success on tasks that end at the goal)."""
    sera_condition: str = "value"
    """What the entropy is conditioned on: value (VCSE: V(s) = min Q(s, policy mean)) or q_data
    (Q(s, a) at the transition's action, an earlier reading of SERA)."""
    q_target_clip: bool = False
    """Clip the target critic's Q' to [min r, max r] / (1 - gamma) over the training data (after reward
    scale and bias), as OOO's bound_q_functions: o2o-retrain turns it on; OOO's exploring agent uses it
    on maze2d, Kitchen and hammer, the bounds widening with the online rewards."""
    grad_clip: float | None = None
    """Max gradient norm of the critic (None = no clipping; the official code does not clip)."""
    compile: bool = False
    """torch.compile the update step (CUDA graphs on GPU with compile_mode=reduce-overhead)."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead or max-autotune."""


DATA_FIELDS = DataSettings.names()
"""`algo` fields that define the data (rewards, MC returns, TD targets): fine-tuning keeps the
checkpoint's, for offline and online rows alike, and refuses an override that differs."""


@dataclasses.dataclass
class EvalConfig:
    every: int = 5000
    """Evaluate every N updates (0 = only at the end)."""
    episodes: int = 10
    """Deterministic episodes per evaluation."""
    seed: int = 10_000
    """Seed of the first evaluation episode's reset (episode i uses seed + i)."""


@dataclasses.dataclass
class PretrainConfig:
    task: str = "pointmaze-umaze"
    """o2o task name (see `o2o-dataset tasks`)."""
    dataset: str = "o2o/pointmaze-umaze/mixed-v0"
    """Minari dataset id (under MINARI_DATASETS_PATH) or a dataset folder path."""
    build_missing_dataset: bool = True
    """Build an o2o dataset id (o2o/<task>/<quality>-v0) locally if it is not there, and refuse one
    there that was built with other parameters than build_episodes / build_seed."""
    build_episodes: int | None = None
    """Episodes of an o2o dataset (None = the task's default, as `o2o-dataset build`: 300 for the
    mazes and pusher, 500 for fetch, 100 for fetch-push-pixels)."""
    build_seed: int = 0
    """Seed of an o2o dataset's scripted controller and resets (`o2o-dataset build --seed`)."""
    rebuild_dataset: bool = False
    """Rebuild an o2o dataset that was built with other parameters (else the run stops and says how)."""
    steps: int = 20_000
    """Gradient updates."""
    batch_size: int = 256
    """Transitions per update."""
    seed: int = 0
    """Seed of torch (networks, sampling)."""
    device: str = "auto"
    """auto = cuda when available, else cpu."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    log_every: int = 500
    """Write averaged metrics every N updates."""
    checkpoint_every: int = 5000
    """Write checkpoint.pt (and policy.onnx when pretraining) every N updates."""
    resume: str | None = None
    """A run folder (or the checkpoint.pt in it) to continue exactly: weights, optimiser, RNG and
    step as saved. An online run also goes on in that folder, with its replay store."""
    out_dir: str = "runs/pretrain"
    """Run folders go to <out_dir>/<task>/<time>."""
    progress: bool = True
    """Show a progress bar."""
    algo: CalQLConfig = field(default_factory=CalQLConfig)
    """The algorithm (Cal-QL / CQL) settings."""
    net: NetworkConfig = field(default_factory=NetworkConfig)
    """Network shapes and initialisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation in the task's env."""


@dataclasses.dataclass
class OnlineConfig(PretrainConfig):
    """Online fine-tuning: every pretraining field (task, dataset, algo, net...) plus these."""

    log_every: int = 200
    """Write averaged metrics every N updates (more often than pretraining: online returns and policy lag)."""
    out_dir: str = "runs/online"
    """Run folders go to <out_dir>/<task>/<time>."""
    pretrained: str | None = None
    """Checkpoint (or run folder) to start from; None = pretrain first for `steps` updates."""
    endpoint: str = "tcp://127.0.0.1:5555"
    """Where actors connect (ZeroMQ ROUTER). Use tcp://0.0.0.0:5555 to accept remote actors
    (that needs `keys`, or `insecure=true`)."""
    keys: str | None = None
    """CURVE key folder made by `o2o-keys init` (README, 'Securing the link'): encrypt the link and
    accept only the actors in its allow-list, each bound to its actor_id. None = open (loopback only)."""
    insecure: bool = False
    """Allow an open (unencrypted, unauthenticated) endpoint that other machines can reach."""
    store: str | None = None
    """Zarr replay store folder; None = <run folder>/replay."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    """The ingest server and how it writes the store: group commit, fsync, rate limit, idle actors
    (transport/config.py: IngestConfig), e.g. ingest.max_rows_per_s=20000."""
    online_updates: int = 20_000
    """Stop after this many online updates (0 = run until interrupted)."""
    utd: float = 1.0
    """Updates per trainable online transition (update-to-data ratio)."""
    # A sampling setting of the run, not of the agent: here, not in `algo`. Pretraining draws only offline
    # data, so PretrainConfig has no such field; preset=paper's Kitchen 0.25 therefore comes from a
    # learner-only group (configs/online_task/, composed by o2o-learner and o2o-launch), not from
    # paper_domain/, which o2o-pretrain and o2o-retrain compose too.
    offline_ratio: float = 0.5
    """Fraction of each fine-tuning batch drawn from the offline data, the rest from the online rows (the
    official mixing_ratio: 0.5 for AntMaze and Adroit, 0.25 for Kitchen, which preset=paper sets)."""
    warmup_rows: int = 1000
    """Online rows to collect before the first online update."""
    max_updates_ahead: int = 1000
    """Samples-per-insert tolerance: updates allowed beyond utd x rows before the learner waits for data."""
    max_rows_ahead: int = 20_000
    """Hold the actors (at their next episode end) when they are this many transitions ahead of
    updates / utd; release at half. 0 = never hold (actors run free, the learner lags)."""
    publish_every: int = 1000
    """Publish a new ONNX policy to the actors every N updates."""
    buffer_capacity: int = 0
    """Online transitions kept in the sampling buffer (FIFO past this); 0 = 1,000,000 for a state task,
    100,000 for a camera task (DrQ's replay size: 100k 84x84x3 frames are 2 GiB). The memory it takes is
    logged at start, and a buffer larger than the machine's free memory is refused before training."""
    train_on_eval: bool = False
    """Also train on actors' deterministic evaluation episodes."""
    stats_every_s: float = 5.0
    """Log actor statistics (steps/s, policy lag, last contact) this often."""
    eval_every_steps: int = 1000
    """Evaluate the current policy every N online env steps (committed rows), as the official code
    does every 1000: eval.episodes deterministic episodes in the learner's own env, seeds eval.seed + i,
    the same each time. Also once before the first online update and once at the end (0 = only those)."""
    from_scratch: bool = False
    """An online agent with no offline data: a fresh agent (algo and net as given; SAC is
    algo.cql_alpha=0 algo.calibrated=false), no offline rows in its batches, no policy published
    before warmup_rows (the actors act at random: policy.act_before_policy=true)."""
    retrain_every: int = 0
    """Run o2o-retrain beside the learner on the store's committed rows every N online updates
    (0 = never): offline RL as a subroutine of online RL (learner/subroutine.py)."""
    retrain_at_end: bool = False
    """Also retrain on the whole store when the online updates are done."""
    retrain_mode: str = "recommend"
    """What a finished retrain is used for: "recommend" (evaluated and exported as <run>/recommended.onnx,
    the online agent keeps exploring) or "fine_tune" (the online agent continues from the retrained one)."""
    retrain_steps: int = 0
    """Gradient updates of each retrain; 0 = as many as the online agent it is compared with has had
    (its pretraining plus its online updates so far), as OOO retrains for a full budget."""
    retrain_args: list[str] = field(default_factory=list)
    """More o2o-retrain overrides; quote each on the command line: retrain_args=['algo.calibrated=true','high_reward_extra=0']."""
