"""``itune-train``: instruction-tune a model from a config file.

  itune-train --config=configs/smoke.py --workdir=/tmp/itune_smoke
  python -m itune.train --config=configs/smoke.py:runlocal --workdir=/tmp/w --config.train.num_steps=5

Starting again with the same workdir resumes from its last checkpoint.
"""

import os
import sys

# Before TensorFlow is first imported: no start-up banner, and no oneDNN rewrites (TensorFlow
# only feeds data here).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging
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
    from itune.training.trainer import train_and_evaluate  # After the runtime is set up.

    train_and_evaluate(_CONFIG.value, os.path.abspath(_WORKDIR.value))


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad flag or config override ends the program with a one-line message."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # A misspelt override surfaces from ml_collections as the repr of a multi-line message.
        message = str(e)
        if len(message) > 1 and message[0] == message[-1] == "'":
            message = message[1:-1]
        message = message.replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
        sys.exit(f"itune-train: error in flags or config overrides: {message}")


def run():
    """Console entry point."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
