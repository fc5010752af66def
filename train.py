"""Train one BiLLa stage: `python train.py [stage=pretrain|task_mix|sft] [model=..] [data=..] [hardware=..]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    from billa.train import run  # imported here so `--help` and `--cfg job` stay fast

    return run(cfg)


if __name__ == "__main__":
    main()
