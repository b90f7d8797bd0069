"""``itune-inspect``: look at what a config trains on before training it.

  itune-inspect --config=configs/smoke.py --workdir=/tmp/itune_smoke
  itune-inspect --model=model.gguf --chats=chats.jsonl

With a config: prints the first rows of real training batches (segments separated by ``║``,
trained tokens highlighted), writes the same as ``<workdir>/inspect.html``, and prints the
pipeline statistics. With ``--model`` (a model folder, GGUF file, training workdir or tokenizer
folder): renders each chat of ``--chats`` (JSON or JSONL: ``{"messages", "tools"}`` records, or
lists of messages) with the model's own chat template (or ``--chat_format``), and prints the text
and its tokens with the trained spans marked.
"""

import itertools
import json
import os
import sys

from itune.cli import common as cli
from itune.errors import UserError

cli.quiet_tensorflow()

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The config file, with its arguments after a colon.", lock_config=True
)
_MODEL = flags.DEFINE_string(
    "model",
    None,
    "Instead of a config: a model folder, GGUF file, training workdir or tokenizer folder, whose "
    "chat template renders --chats.",
)
_CHATS = flags.DEFINE_string(
    "chats", None, "With --model: JSON or JSONL chats ({messages, tools} records, or lists)."
)
cli.define_chat_format_flag()
_TRAIN_ON = flags.DEFINE_enum(
    "train_on", "all_assistant", ["all_assistant", "last_assistant", "all"], "With --model."
)
_TRAIN_ON_REASONING = flags.DEFINE_bool(
    "train_on_reasoning", True, "With --model: train the turns' reasoning text."
)
_TEMPLATE_KWARGS = flags.DEFINE_string(
    "template_kwargs",
    "{}",
    'With --model: template variables as JSON, e.g. {"enable_thinking": false}.',
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The run's folder: its tokenizer is kept there, and inspect.html written."
)
_ROWS = flags.DEFINE_integer("rows", 4, "Rows to show.")
_BATCHES = flags.DEFINE_integer("batches", 1, "Batches to read for the statistics.")
_COLOR = flags.DEFINE_bool(
    "color",
    None,
    "Highlight trained tokens with terminal colours; default: when printing to a "
    "terminal and NO_COLOR is not set.",
)


def inspect(config, workdir: str, num_rows: int, num_batches: int, color: bool) -> str:
    """Prints the view and statistics; returns the path of the HTML page."""
    from itune.convert import run_model
    from itune.data import inspection, packing, pipeline
    from itune.data import spec as data_spec

    pipeline.configure_tensorflow()
    os.makedirs(workdir, exist_ok=True)
    run = run_model.resolve(config, workdir)
    spec = data_spec.make_spec(config.data, workdir, run.tokenizer, run.chat_format)
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


def read_chats(path: str) -> list[tuple[list, object]]:
    """``(messages, tools)`` of each chat in a JSON (a list of chats, or one) or JSONL file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
        records = (
            records
            if isinstance(records, list) and records and not _is_message(records[0])
            else [records]
        )
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    chats = []
    for n, record in enumerate(records):
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            chats.append((record["messages"], record.get("tools")))
        elif isinstance(record, list):
            chats.append((record, None))
        else:
            raise ValueError(
                f"{path}: chat {n}: expected {{messages, tools}} or a list of messages"
            )
    return chats


def _is_message(value) -> bool:
    return isinstance(value, dict) and "role" in value


def model_chat_format(path: str, chat_format: str | None):
    """``(tokenizer, chat format)`` of a model, workdir or tokenizer folder."""
    from itune.convert import model_dir, tokenizer_files
    from itune.data import chat

    try:
        _, tokenizer, own = model_dir.describe(path)
    except ValueError:
        if not os.path.isdir(path):
            raise
        tokenizer, own = tokenizer_files.load_hf_tokenizer(path)
    return tokenizer, chat.get_format(chat_format or own or "chatml")


def inspect_chats(path, chats_file, chat_format, train_on, train_on_reasoning, kwargs, color):
    """Prints each chat of ``chats_file`` as ``path``'s chat template renders it for training."""
    from itune.data import chat, inspection, jinja_template

    tokenizer, fmt = model_chat_format(path, chat_format)
    if isinstance(fmt, chat.ChatTemplate):
        fmt = fmt.replace(
            kwargs={**fmt.kwargs, **kwargs},
            train_on_reasoning=train_on_reasoning,
            special_tokens=fmt.special_tokens or jinja_template.special_tokens_of(tokenizer),
        )
    for n, (messages, tools) in enumerate(read_chats(chats_file)):
        print(f"--- chat {n}: {len(messages)} messages, {fmt.name} ---")
        print(inspection.chat_view(tokenizer, fmt, messages, tools, train_on, color))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from itune.data import inspection

    color = inspection.use_color(sys.stdout) if _COLOR.value is None else _COLOR.value
    if _MODEL.value:
        if not _CHATS.value:
            raise app.UsageError("--model needs --chats, the chats to render")
        try:
            kwargs = json.loads(_TEMPLATE_KWARGS.value)
        except json.JSONDecodeError as e:
            raise app.UsageError(f"--template_kwargs: not JSON ({e})") from None
        try:
            inspect_chats(
                _MODEL.value,
                _CHATS.value,
                flags.FLAGS.chat_format,
                _TRAIN_ON.value,
                _TRAIN_ON_REASONING.value,
                kwargs,
                color,
            )
        except ValueError as e:
            raise UserError(str(e)) from e
        return
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("give --config and --workdir, or --model and --chats")
    cli.check_output_folder(_WORKDIR.value, "workdir")
    inspect(_CONFIG.value, os.path.abspath(_WORKDIR.value), _ROWS.value, _BATCHES.value, color)


def run():
    """Console entry point."""
    cli.run(main)


if __name__ == "__main__":
    run()
