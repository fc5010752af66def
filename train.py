"""Train one BiLLa stage or a pipeline: `python train.py [stage=..|pipeline=..] [model=..] [data=..] [hardware=..]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    from billa.cli import train  # imported here so `--help` and `--cfg job` stay fast

    return train(cfg)


if __name__ == "__main__":
    main()
