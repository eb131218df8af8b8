"""Fine-tune a model on a clip dataset: a LoRA or the full transformer.

    accelerate launch train.py +experiment=style_lora model.path=/models/happyhorse-1.0 data.dataset=my_dataset
    python train.py +experiment=demo                      # the CPU demo (scripts/demo.sh prepares its data)
    python train.py +experiment=demo resume=latest        # continue a run from its newest checkpoint

Every option: configs/train.yaml and the groups it lists; docs/training.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from happyhorse_train.config import register_configs
from happyhorse_train.errors import report_user_errors

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> None:
    from happyhorse_train.training.config_checks import check_train_config

    check_train_config(cfg)  # before any model loads
    from happyhorse_train.training.trainer import train

    train(cfg)


if __name__ == "__main__":
    main()
