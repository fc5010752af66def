"""Stage-2 rationales: `python rationale.py input=<tasks.jsonl> output=<out.jsonl>` (see conf/rationale.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="rationale")
def main(cfg: DictConfig) -> dict:
    from billa.rationale import run

    return run(cfg)


if __name__ == "__main__":
    main()
