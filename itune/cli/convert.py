"""``itune-convert SRC DST``: between Hugging Face folders, GGUF files, itune model folders and
training workdirs.

  itune-convert model.gguf /tmp/smollm2                 # GGUF -> itune model folder
  itune-convert /tmp/smollm2 /tmp/smollm2_hf            # itune -> Hugging Face folder
  itune-convert /tmp/run/workdir /tmp/tuned_hf --to=hf  # a training run's newest checkpoint

SRC, read (``--from``):
  itune     an itune model folder: model.json, params/, tokenizer/
  hf        a Hugging Face folder: config.json (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3,
            Mixtral, Qwen3-MoE), *.safetensors and the tokenizer's files
  gguf      a llama.cpp GGUF file (llama, qwen3, qwen3moe, gemma2 or gemma3 architecture),
            any quantization
  workdir   a training workdir (``itune-train --workdir``): its newest checkpoint
DST, written (``--to``), a path that does not exist yet:
  itune     an itune model folder
  hf        a Hugging Face folder (safetensors, split at ``--max_shard_gb``)

What SRC is comes from the path (``--from`` names it otherwise); DST is an itune folder when SRC
is a Hugging Face folder or a GGUF file, and a Hugging Face folder otherwise (``--to`` decides).
Nothing is written under DST until the conversion has succeeded: a failure (unknown
architecture, missing tensor, shape mismatch, unsupported config field) stops with a one-line
message naming it.
"""

from __future__ import annotations

import os

from itune import atomic, runtime
from itune.cli import common as cli
from itune.errors import UserError

cli.quiet_tensorflow()

from absl import app, flags

_FROM = flags.DEFINE_enum("from", None, ["itune", "hf", "gguf", "workdir"], "What SRC is.")
_TO = flags.DEFINE_enum("to", None, ["itune", "hf"], "What to write at DST.")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16", "float16"], "Parameter dtype to write (default: kept)."
)
_MAX_SHARD_GB = flags.DEFINE_float(
    "max_shard_gb", 5.0, "Hugging Face export: safetensors files above this size are split."
)


def convert(
    src: str,
    dst: str,
    source_kind=None,
    target_kind=None,
    dtype=None,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    """Converts ``src`` to ``dst``; returns the kind written (``itune`` or ``hf``)."""
    from itune.convert import hf, model_dir  # noqa: PLC0415

    source_kind = source_kind or model_dir.kind_of(src)
    target_kind = target_kind or ("itune" if source_kind in ("hf", "gguf") else "hf")
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists; choose a new path")
    overrides = {"param_dtype": dtype} if dtype else {}
    loaded = model_dir.load_model(src, kind=source_kind, **overrides)
    # Both writers build DST in a temporary folder beside it and rename it at the end: a failure
    # (a full disk, Ctrl-C) leaves nothing behind.
    try:
        if target_kind == "itune":
            model_dir.save_model(
                dst, loaded.config, loaded.params, loaded.tokenizer, loaded.chat_format
            )
        else:
            hf.save_hf(
                dst,
                loaded.config,
                loaded.params,
                loaded.tokenizer,
                loaded.chat_format,
                max_shard_bytes=max_shard_bytes,
            )
    except Exception as e:
        reason = atomic.write_failure(e)
        if reason is None or isinstance(e, FileExistsError):
            raise
        raise UserError(
            f"cannot write {dst}: {reason}; nothing was written: make room (or choose a "
            "writable place) and run again"
        ) from e
    return target_kind


def main(argv):
    if len(argv) != 3:
        raise app.UsageError("expected two arguments, SRC and DST")
    src, dst = argv[1:]
    runtime.initialize()
    try:
        kind = convert(
            src, dst, _FROM.value, _TO.value, _DTYPE.value, int(_MAX_SHARD_GB.value * 2**30)
        )
    except (ValueError, KeyError) as e:  # Not a model, or one that does not convert.
        raise UserError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
    print(f"Wrote {'an itune model folder' if kind == 'itune' else 'a Hugging Face folder'}: {dst}")


def run():
    """Console entry point."""
    cli.run(main, args="SRC DST")


if __name__ == "__main__":
    run()
