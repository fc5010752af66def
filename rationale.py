"""Stage-2 rationales: `python rationale.py input=<tasks.jsonl> output=<out.jsonl>` (see conf/rationale.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="rationale")
def main(cfg: DictConfig) -> dict:
    from billa.openai_client import OpenAIConfigError
    from billa.rationale import RationaleError, run

    try:
        return run(cfg)
    except (OpenAIConfigError, RationaleError) as err:  # a user's mistake: its message, not a traceback
        raise SystemExit(f"rationale.py: error: {err}") from None


if __name__ == "__main__":
    main()
