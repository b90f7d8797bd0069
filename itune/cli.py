"""What every command-line entry point shares: quiet start-up and clean flag errors."""

import os
import sys

from absl import flags


def quiet_tensorflow() -> None:
    """Call before TensorFlow is first imported: no banner, no oneDNN rewrites (TF only feeds
    data here)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


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
        program = os.path.basename(argv[0])
        sys.exit(f"{program}: error in flags or config overrides: {message}")
