"""``python -m runner recipe=<name> [key=value ...]``: compose the config with Hydra and run one job.

Thin on purpose: the job itself is `runner.cli.main_job` (a recipe run, or a pipeline of them).
Before Hydra parses the command line, the options it names are checked (a misspelled model option
is an error with a did-you-mean, not a silent fall-back to the recipe's default) and a role the
command line sets gets its node (`runner.compose.with_role_nodes`).
"""

import sys
from pathlib import Path

import hydra

from runner.compose import check_options, with_role_nodes
from runner.config import register_configs
from runner.errors import ConfigError
from runner.resolvers import register_resolvers

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg):
    from runner.cli import main_job

    main_job(cfg)


if __name__ == "__main__":
    problems = check_options(sys.argv[1:])
    if problems:
        print(f"error: {ConfigError(problems)}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = with_role_nodes(sys.argv[1:])
    main()
