"""``python -m runner recipe=<name> [key=value ...]``: compose the config with Hydra and run one job.

Thin on purpose: the job itself is `runner.cli.main_job` (a recipe run, or a pipeline of them).
"""

from pathlib import Path

import hydra

from runner.config import register_configs
from runner.resolvers import register_resolvers

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg):
    from runner.cli import main_job

    main_job(cfg)


if __name__ == "__main__":
    main()
