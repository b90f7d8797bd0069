"""``itune-train``: instruction-tune a model from a config file.

  itune-train --config=configs/smoke.py --workdir=/tmp/itune_smoke
  python -m itune.cli.train --config=configs/smoke.py:runlocal --workdir=/tmp/w --config.train.num_steps=5

Starting again with the same workdir resumes from its last checkpoint.
"""

import os

from itune.cli import common as cli
from itune.errors import UserError

cli.quiet_tensorflow()

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The run's config file, with its arguments after a colon.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "The run's folder (checkpoints, metrics, results); given again, the run resumes from its "
    "last checkpoint.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.check_output_folder(_WORKDIR.value, "workdir")
    from itune.runtime import initialize

    initialize()
    from itune.training.trainer import train_and_evaluate  # After the runtime is set up.

    try:
        train_and_evaluate(_CONFIG.value, os.path.abspath(_WORKDIR.value))
    except FloatingPointError as e:  # The loss diverged: the run stops with its message.
        raise UserError(str(e)) from e


def run():
    """Console entry point."""
    cli.run(
        main,
        required=["config", "workdir"],
        interrupted="interrupted; start it again with the same --workdir to resume from its "
        "last checkpoint",
    )


if __name__ == "__main__":
    run()
