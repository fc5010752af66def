"""Stage-2 rationales: `python rationale.py input=<tasks.jsonl> output=<out.jsonl>` (see conf/rationale.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="rationale")
def main(cfg: DictConfig) -> dict:
    from billa.cli import rationale  # imported here so `--help` and `--cfg job` stay fast

    return rationale(cfg)


if __name__ == "__main__":
    main()
