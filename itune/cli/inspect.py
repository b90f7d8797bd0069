"""``itune-inspect``: look at what a config trains on before training it.

  itune-inspect --config=configs/smoke.py --workdir=/tmp/itune_smoke

Prints the first rows of real training batches (segments separated by ``║``, trained tokens
highlighted), writes the same as ``<workdir>/inspect.html``, and prints the pipeline statistics.
"""

import itertools
import os
import sys

from itune.cli import common as cli

cli.quiet_tensorflow()

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The config file, with its arguments after a colon.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The run's folder: its tokenizer is kept there, and inspect.html written."
)
_ROWS = flags.DEFINE_integer("rows", 4, "Rows to show.")
_BATCHES = flags.DEFINE_integer("batches", 1, "Batches to read for the statistics.")
_COLOR = flags.DEFINE_bool(
    "color", None, "Highlight trained tokens with terminal colours; default: when printing to a "
    "terminal and NO_COLOR is not set."
)


def inspect(config, workdir: str, num_rows: int, num_batches: int, color: bool) -> str:
    """Prints the view and statistics; returns the path of the HTML page."""
    from itune.convert import run_model
    from itune.data import inspection, packing, pipeline
    from itune.data import spec as data_spec

    pipeline.configure_tensorflow()
    os.makedirs(workdir, exist_ok=True)
    spec = data_spec.make_spec(config.data, workdir, run_model.resolve(config, workdir).tokenizer)
    stats = packing.PackingStats()
    rows = list(
        itertools.islice(
            pipeline.train_rows(config.data, spec, stats), num_batches * spec.global_batch_size
        )
    )
    for i, row in enumerate(rows[:num_rows]):
        print(f"--- row {i} ---")
        print(inspection.format_row(spec.tokenizer, row, color=color))
    summary = inspection.statistics(stats, spec.seq_len, dict(stats.sources))
    batches = "1 batch" if num_batches == 1 else f"{num_batches} batches"
    print(f"--- statistics over {len(rows)} rows ({batches}) ---")
    print(summary)
    path = os.path.join(workdir, "inspect.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(inspection.html_page(spec.tokenizer, rows[:num_rows], summary, "itune-inspect"))
    print(f"Wrote {path}")
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.check_output_folder(_WORKDIR.value, "workdir")
    from itune.data import inspection

    color = inspection.use_color(sys.stdout) if _COLOR.value is None else _COLOR.value
    inspect(_CONFIG.value, os.path.abspath(_WORKDIR.value), _ROWS.value, _BATCHES.value, color)


def run():
    """Console entry point."""
    cli.run(main, required=["config", "workdir"])


if __name__ == "__main__":
    run()
