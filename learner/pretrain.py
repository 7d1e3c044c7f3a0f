"""`o2o-pretrain`: offline Cal-QL pretraining on a Minari dataset (Hydra entry point).

    o2o-pretrain                                   # pointmaze-umaze, preset small, builds its dataset
    o2o-pretrain task=pusher steps=5000            # another task
    o2o-pretrain task=fetch-push preset=paper      # the official settings of the task's domain
    o2o-pretrain resume=runs/pretrain/pusher/...   # continue a run from its checkpoint

Writes into the run folder: metrics.jsonl, tb/ (TensorBoard), checkpoint.pt,
policy.onnx, config.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from o2o.datasets.minari_io import DatasetError

from .checkpoint import CHECKPOINT_NAME, resolve_checkpoint
from .config import PretrainConfig
from .divergence import DivergedError
from .offline import pretrain
from .stopping import Stopped, graceful_stop, requested

ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


@hydra.main(version_base=None, config_path="pkg://o2o.configs", config_name="pretrain")
def _hydra_main(dict_cfg: DictConfig) -> None:
    cfg: PretrainConfig = OmegaConf.to_object(dict_cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        # resume= continues that run in its own folder (a run folder or its checkpoint file), as online.
        run_dir = resolve_checkpoint(cfg.resume).parent if cfg.resume else run_dir
        pretrain(cfg, run_dir)
    except (DatasetError, DivergedError, KeyError, ValueError, FileNotFoundError, MemoryError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"o2o-pretrain: error: {message}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        print(f"o2o-pretrain: stopped by {requested() or 'KeyboardInterrupt'} at step {stop.step} of {cfg.steps}; "
              f"checkpoint and policy written to {run_dir} (the same command with resume={run_dir} continues "
              "it)")  # fmt: skip
        return
    except KeyboardInterrupt:  # while loading or building the data
        print(f"o2o-pretrain: stopped by {requested() or 'KeyboardInterrupt'} before the first update: no checkpoint "
              "written")  # fmt: skip
        return
    print(f"run folder: {run_dir}\n  checkpoint: {run_dir / CHECKPOINT_NAME}\n  policy:     {run_dir / 'policy.onnx'}")


def main() -> None:
    with graceful_stop("o2o-pretrain"):  # SIGTERM too stops gracefully; a second signal exits at once
        _hydra_main()


if __name__ == "__main__":
    main()
