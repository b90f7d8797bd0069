"""``itune-train``: instruction-tune a model from a config file.

  itune-train --config=configs/smoke.py --workdir=/tmp/itune_smoke
  python -m itune.cli.train --config=configs/smoke.py:runlocal --workdir=/tmp/w --config.train.num_steps=5

Starting again with the same workdir resumes from its last checkpoint.
"""

import os
import sys

from itune.cli import common as cli

cli.quiet_tensorflow()

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (path[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from itune.runtime import initialize

    initialize()
    from itune.data.sources import DataError  # After the runtime is set up.
    from itune.training.trainer import train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, os.path.abspath(_WORKDIR.value))
    except (DataError, FloatingPointError) as e:
        sys.exit(f"itune-train: {e}")


def run():
    """Console entry point."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
