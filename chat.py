"""Answer prompts with an exported model through the dialogue template: `python chat.py questions='[...]'`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="chat")
def main(cfg: DictConfig) -> list:
    from billa.cli import chat  # imported here so `--help` and `--cfg job` stay fast

    return chat(cfg)


if __name__ == "__main__":
    main()
