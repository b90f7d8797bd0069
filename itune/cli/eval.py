"""``itune-eval``: score a model on generative tasks; a markdown table and a JSON report.

  itune-eval --checkpoint=/tmp/run --prompt_sets=ifeval_sample,my_gsm8k.jsonl --output_dir=/tmp/ev
  itune-eval --checkpoint=model.gguf --config=configs/smollm2_gsm8k.py

Prompt sets are JSONL files in the formats of `itune.evaluation.harness` (GSM8K exact match,
IFEval verifiable instructions, ROUGE-L), or the names of the built-in ones. ``--config`` adds
the tasks of its ``eval`` section, among them the held-out slices of its data sources (or the
built-in task families), so a model before and after training is scored on the same problems.
An answer has at most ``--max_new_tokens`` tokens when the flag is given, else the config's
``eval.max_new_tokens``, else its task kind's default (1,280 for IFEval, as published).
``--output_dir`` receives ``<stem>.json``, ``<stem>.md`` and every answer with its scores in
``<stem>_outputs.jsonl``. ``--ifeval_official`` scores IFEval by the official checker's rules
where itune's deliberately differ (`itune.evaluation.ifeval`; needs NLTK and its Punkt model).
Sampling flags are those of ``itune-generate`` (greedy by default).
"""

from __future__ import annotations

import json
import os
import sys

from itune import runtime
from itune.cli import common as cli
from itune.errors import UserError

cli.quiet_tensorflow()

from absl import app, flags
from ml_collections import config_flags

cli.define_model_flags()
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Also score the tasks of this config's eval section (a config file, with its arguments "
    "after a colon).",
    lock_config=True,
)
_PROMPT_SETS = flags.DEFINE_list(
    "prompt_sets", [], "JSONL prompt sets, or built-in names (ifeval_sample)."
)
_LIMIT = flags.DEFINE_integer("limit", 0, "Score only the first N prompts of each set (0: all).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Write the report files here.")
_STEM = flags.DEFINE_string("stem", "eval", "File name stem of the report files.")
_IFEVAL_OFFICIAL = flags.DEFINE_bool(
    "ifeval_official",
    False,
    "Score IFEval prompt sets by the official checker's rules where itune's deliberately differ "
    "(sentence counting with NLTK, looser bullets...; see itune.evaluation.ifeval). Needs "
    "`pip install nltk && python -m nltk.downloader punkt_tab`. Also on with the --config's "
    "eval.ifeval_official.",
)


def prompt_sets(config, paths: list[str], limit: int):
    from itune.evaluation import harness, tasks  # noqa: PLC0415

    sets = tasks.prompt_sets(config, limit=limit or None) if config is not None else []
    sets += [harness.load_prompt_set(p, limit=limit or None) for p in paths]
    if not sets:
        raise ValueError("no tasks: pass --prompt_sets, or a --config whose eval section has some")
    return sets


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from itune.evaluation import harness, tasks  # noqa: PLC0415

    runtime.initialize()
    config = _CONFIG.value
    # Each task kind's answer length (IFEval's 1,280 tokens...) unless the flag or the config
    # sets one for all.
    max_new_tokens = None
    if flags.FLAGS["max_new_tokens"].present:
        max_new_tokens = flags.FLAGS.max_new_tokens
    elif config is not None:
        max_new_tokens = config.eval.max_new_tokens or None
    try:
        sets = prompt_sets(config, _PROMPT_SETS.value, _LIMIT.value)
        if _IFEVAL_OFFICIAL.value or (config is not None and config.eval.get("ifeval_official")):
            # Before the model loads: a missing NLTK fails at once.
            tasks.official_ifeval(sets)
        respond, _ = cli.responder_from_flags()
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    print(
        f"Scoring {flags.FLAGS.checkpoint} on {', '.join(f'{s.name} ({len(s.records)})' for s in sets)}",
        file=sys.stderr,
    )
    report = harness.evaluate(sets, respond, max_new_tokens=max_new_tokens)
    print(report.markdown())
    if _OUTPUT_DIR.value:
        written = report.write(os.path.abspath(_OUTPUT_DIR.value), _STEM.value)
        print(f"\nReport: {json.dumps(written)}")
    else:
        print("\n" + json.dumps(report.to_json(), indent=2))


def run():
    """Console entry point."""
    cli.run(main, required=["checkpoint"])


if __name__ == "__main__":
    run()
