"""Evaluate a model: `python evaluate.py [task=ppl|logiqa2|c3|answers|judge|report|[ppl,c3]] [model_path=..]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from billa.cli import evaluate  # imported here so `--help` and `--cfg job` stay fast

    return evaluate(cfg)


if __name__ == "__main__":
    main()
