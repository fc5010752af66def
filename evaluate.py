"""Evaluate a model: `python evaluate.py [task=ppl|logiqa2|c3|answers|judge|report|[ppl,c3]] [model_path=..]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from pathlib import Path

    from billa.evaluate import run  # imported here so `--help` and `--cfg job` stay fast

    result = run(cfg)
    for task in result["metrics"]:
        print(Path(result["output_dir"], f"{task}.md").read_text(encoding="utf-8"))
    return result


if __name__ == "__main__":
    main()
