"""``itune-generate``: answers from a model, in its chat format, through itune's sampler.

  itune-generate --checkpoint=/tmp/smollm2 --prompt="What is the capital of France?"
  itune-generate --checkpoint=model.gguf --prompts_file=prompts.jsonl --output=answers.jsonl \\
      --temperature=0.7 --top_p=0.9 --seed=1

``--checkpoint`` is anything `itune.convert.model_dir.load_model` reads: an itune model folder, a
Hugging Face folder, a GGUF file or a training workdir. Prompts come from ``--prompt``
(repeatable) or a JSONL file whose lines hold a ``prompt`` (or ``messages``). Decoding is greedy
unless ``--temperature`` is set (then ``--top_k``, ``--top_p`` and ``--seed`` apply); the model
is sharded over all local devices.
"""

from __future__ import annotations

import json

from itune import runtime
from itune.cli import common as cli
from itune.errors import UserError

cli.quiet_tensorflow()

from absl import app, flags

cli.define_model_flags()
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A user message.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "JSONL of {prompt} or {messages}.")
_SYSTEM = flags.DEFINE_string("system", None, "A system message before each prompt.")
_OUTPUT = flags.DEFINE_string("output", None, "Write {messages, answer} lines to this JSONL file.")


def conversations(prompts, prompts_file, system) -> list[list[dict]]:
    """The chats to answer, each ending with a user turn."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{prompts_file}:{number}: malformed JSON: {e.msg}") from None
                if "messages" in record:
                    chats.append(list(record["messages"]))
                elif isinstance(record.get("prompt"), str):
                    chats.append([{"role": "user", "content": record["prompt"]}])
                else:
                    raise ValueError(
                        f"{prompts_file}:{number}: expected a 'prompt' string or " "'messages'"
                    )
    if system:
        chats = [[{"role": "system", "content": system}] + c for c in chats]
    if not chats:
        raise ValueError("no prompts: pass --prompt or --prompts_file")
    return chats


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    runtime.initialize()
    try:
        chats = conversations(_PROMPT.value, _PROMPTS_FILE.value, _SYSTEM.value)
        respond, _ = cli.responder_from_flags()
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    answers = respond(chats)
    out = open(_OUTPUT.value, "w", encoding="utf-8") if _OUTPUT.value else None
    for messages, text in zip(chats, answers):
        print(f">>> {messages[-1]['content']}\n{text}\n")
        if out:
            out.write(json.dumps({"messages": messages, "answer": text}, ensure_ascii=False) + "\n")
    if out:
        out.close()


def run():
    """Console entry point."""
    cli.run(main, required=["checkpoint"])


if __name__ == "__main__":
    run()
