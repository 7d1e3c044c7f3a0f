"""OOO's per-domain settings (preset=paper) reach o2o-pretrain, o2o-learner, o2o-launch and o2o-retrain,
each through its own strict schema, and o2o-launch keeps preset=paper's budgets; Cal-QL's fine-tuning
mix (offline_ratio, a learner setting) reaches o2o-learner and o2o-launch only.

Every config is composed with Hydra's compose API, as the commands compose theirs."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

import o2o.configs
import o2o.launch.experiment  # noqa: F401 (registers experiment_schema)
import o2o.learner.online  # noqa: F401 (registers online_schema)
import o2o.learner.pretrain  # noqa: F401 (registers pretrain_schema)
import o2o.learner.retrain  # noqa: F401 (registers retrain_schema)
from o2o.learner.config import OnlineConfig
from o2o.launch.commands import learner_command
from o2o.launch.config import GROUPS, hydra_overrides

CONFIGS = Path(o2o.configs.__file__).parent

# task: (OOO domain, RND beta, exploring agent's Q' bound, retrain offline share, retrain upsampling,
# pretraining steps of the Cal-QL column). Sources: MaxSobolMark/OOO ooo_for_calql_scripts.md (README table).
PAPER = {
    "pointmaze-umaze": ("maze2d", 10.0, True, None, 32, 1_000_000),
    "pointmaze-medium": ("maze2d", 10.0, True, None, 32, 1_000_000),
    "pointmaze-umaze-pixels": ("maze2d", 10.0, True, None, 32, 1_000_000),  # the mazes seen by a camera
    "pointmaze-medium-pixels": ("maze2d", 10.0, True, None, 32, 1_000_000),
    "pusher": ("kitchen", 10.0, True, 0.25, 0, 500_000),
    "adroit-door-binary": ("adroit", 0.5, False, 0.5, 0, 20_000),
    "fetch-push": ("adroit", 0.5, False, 0.5, 0, 20_000),
    "fetch-push-pixels": ("adroit", 0.5, False, 0.5, 0, 20_000),  # fetch-push seen by a camera
    "fetch-pick": ("adroit", 0.5, False, 0.5, 0, 20_000),
    "arm-reach": ("maze2d", 10.0, True, None, 32, 1_000_000),  # a sparse reach, as the mazes (o2o's own task)
}


# Cal-QL's mixing_ratio (the learner's offline_ratio) where its column is not the default 0.5: Kitchen.
OFFLINE_RATIO = {"pusher": 0.25}


def composed(name: str, *overrides: str):
    with initialize_config_module("o2o.configs", version_base=None):
        return OmegaConf.to_object(compose(name, overrides=list(overrides)))


def test_every_task_has_its_ooo_settings():
    assert set(PAPER) == {p.stem for p in (CONFIGS / "task").glob("*.yaml")}


@pytest.mark.parametrize("task", PAPER)
def test_the_exploring_agent_gets_its_domains_settings_and_the_other_methods_keep_plain_calql(task):
    _, beta, bound, _, _, steps = PAPER[task]
    for name in ("pretrain", "learner"):
        explorer = composed(name, f"task={task}", "preset=paper", "algo.rnd=true")
        assert (explorer.algo.rnd_coef, explorer.algo.q_target_clip, explorer.steps) == (beta, bound, steps)
        plain = composed(name, f"task={task}", "preset=paper")  # calql, cql, calql_sera: no bound on Q'
        assert plain.algo.q_target_clip is False and plain.algo.rnd is False
    overridden = composed("pretrain", f"task={task}", "preset=paper", "algo.rnd=true", "algo.q_target_clip=false")
    assert overridden.algo.q_target_clip is False  # an explicit override still wins


@pytest.mark.parametrize("task", PAPER)
def test_the_retrain_gets_its_domains_mix_and_upsampling_and_runs_cql_with_the_bound(task):
    _, beta, _, share, extra, _ = PAPER[task]
    cfg = composed("retrain", f"task={task}", "preset=paper")
    assert (cfg.offline_share, cfg.high_reward_extra) == (share, extra)
    assert cfg.algo.calibrated is False and cfg.algo.q_target_clip is True and cfg.algo.rnd is False
    small = composed("retrain", f"task={task}")  # preset=small: OOO's defaults, proportional, no upsampling
    assert (small.offline_share, small.high_reward_extra, small.algo.calibrated) == (None, 0, False)


@pytest.mark.parametrize("task", PAPER)
def test_the_fine_tuning_mix_is_the_learners_own_setting(task):
    """offline_ratio is OnlineConfig's (not algo's): preset=paper gives Kitchen's 0.25 to o2o-learner and
    o2o-launch's learner, while o2o-pretrain and o2o-retrain, composing the same preset_task, have no such field."""
    ratio = OFFLINE_RATIO.get(task, 0.5)
    assert composed("learner", f"task={task}", "preset=paper").offline_ratio == ratio
    assert composed("learner", f"task={task}").offline_ratio == 0.5  # preset=small
    assert composed("learner", f"task={task}", "preset=paper", "offline_ratio=0.4").offline_ratio == 0.4
    assert launch(f"task={task}", "preset=paper")[0].learner.offline_ratio == ratio
    for name in ("pretrain", "retrain"):
        cfg = composed(name, f"task={task}", "preset=paper")
        assert not hasattr(cfg, "offline_ratio") and not hasattr(cfg.algo, "offline_ratio")


def test_the_old_algo_offline_ratio_is_refused_by_name():
    with pytest.raises(ConfigCompositionException, match="algo.offline_ratio"):
        composed("learner", "algo.offline_ratio=0.3")


def domain(path: Path, group: str) -> str:
    """The one domain of config group ``group`` that a task's file names in its defaults."""
    entries = [e for e in yaml.safe_load(path.read_text())["defaults"] if e.startswith(f"/{group}/")]
    assert len(entries) == 1, entries
    return entries[0].split("/")[2].split("@")[0]


@pytest.mark.parametrize("task", PAPER)
def test_one_ooo_domain_per_task(task):
    """preset_task/paper (exploring agent) and retrain_task/paper (retraining) name the same OOO domain."""
    ooo = PAPER[task][0]
    assert domain(CONFIGS / "preset_task" / "paper" / f"{task}.yaml", "ooo_domain") == ooo
    assert domain(CONFIGS / "retrain_task" / "paper" / f"{task}.yaml", "ooo_retrain") == ooo


@pytest.mark.parametrize("task", PAPER)
def test_one_calql_column_per_task(task):
    """online_task/paper (fine-tuning, where a task has one) names preset_task/paper's Cal-QL column."""
    online = CONFIGS / "online_task" / "paper" / f"{task}.yaml"
    assert online.exists() == (task in OFFLINE_RATIO)
    if online.exists():
        column = domain(CONFIGS / "preset_task" / "paper" / f"{task}.yaml", "paper_domain")
        assert domain(online, "paper_online") == column
        assert (CONFIGS / "paper_domain" / f"{column}.yaml").exists()


def launch(*args: str):
    with initialize_config_module("o2o.configs", version_base=None):
        cfg = compose("launch", overrides=hydra_overrides(list(args)), return_hydra_config=True)
    groups = {group: cfg.hydra.runtime.choices[f"{group}@learner"] for group in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_object(cfg), groups


@pytest.mark.parametrize("task", ["pointmaze-umaze", "pusher", "fetch-push"])
def test_launch_with_preset_paper_keeps_the_presets_budgets(task, tmp_path):
    cfg, groups = launch(f"task={task}", "preset=paper", "learner.algo.rnd=true")
    defaults = OnlineConfig()
    assert cfg.learner.steps == PAPER[task][-1]  # the domain's pretraining, not launch's 2,000
    assert (cfg.learner.online_updates, cfg.learner.publish_every, cfg.learner.max_rows_ahead) == (
        defaults.online_updates, defaults.publish_every, defaults.max_rows_ahead)  # o2o-learner's, as without launch
    assert (cfg.learner.algo.rnd_coef, cfg.learner.algo.q_target_clip) == PAPER[task][1:3]  # under `learner`
    # The learner it starts composes the same config.
    args = learner_command(cfg, groups, {"learner.algo.rnd"}, tmp_path, "tcp://127.0.0.1:5000")[3:]
    learner = composed("learner", *[a for a in args if not a.startswith("hydra.")])
    assert learner == dataclasses.replace(cfg.learner, endpoint="tcp://127.0.0.1:5000", progress=False)

    small, _ = launch(f"task={task}")  # the launcher's short run stays with preset=small
    assert (small.learner.steps, small.learner.online_updates, small.learner.publish_every,
            small.learner.max_rows_ahead) == (2000, 2000, 250, 500)  # fmt: skip
    assert composed("launch", "task@learner=pusher", "learner.steps=7").learner.steps == 7  # the command line wins


def test_the_ooo_methods_say_which_exploring_agent_they_run():
    calql = composed("experiment", "method=calql_rnd_ooo").method
    cql = composed("experiment", "method=cql_rnd_ooo").method
    assert calql.pretrain_algo == {"rnd": True}  # the paper: Cal-QL + RND
    assert cql.pretrain_algo == {"rnd": True, "calibrated": False}  # the release (no --enable_calql)
    retraining = lambda m: (m.online_algo, m.retrain_mode, m.retrain_every, m.retrain_at_end)  # noqa: E731
    assert retraining(cql) == retraining(calql) and cql.pretrain != calql.pretrain  # same retraining, own pretraining
