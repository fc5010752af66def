"""Conversions: `python convert.py op=zero_to_hf op.checkpoint=<dir> op.out_dir=<dir>` (see conf/convert.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="convert")
def main(cfg: DictConfig) -> dict:
    from billa.cli import convert  # imported here so `--help` and `--cfg job` stay fast

    return convert(cfg)


if __name__ == "__main__":
    main()
