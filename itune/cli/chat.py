"""``itune-chat``: an interactive chat with a model in the terminal.

  itune-chat --checkpoint=../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

Each line you type is a user turn; the model answers in its chat format with the whole
conversation so far as context. ``/reset`` starts a new conversation, ``/exit`` (or end of
input) quits. Sampling flags are those of ``itune-generate``.
"""

from __future__ import annotations

import sys

from itune import runtime
from itune.cli import common as cli
from itune.errors import UserError

cli.quiet_tensorflow()

from absl import app, flags

cli.define_model_flags()
_SYSTEM = flags.DEFINE_string("system", None, "A system message that opens the conversation.")


def converse(respond, lines, write, system: str | None = None) -> list[dict]:
    """Answers each line of ``lines`` in turn, keeping the conversation; returns it."""
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(opening)
            write("(new conversation)\n")
            continue
        messages.append({"role": "user", "content": text})
        answer = respond([messages])[0]
        messages.append({"role": "assistant", "content": answer})
        write(f"{answer}\n\n")
    return messages


def _typed_lines():
    while True:
        try:
            yield input("you> " if sys.stdin.isatty() else "")
        except EOFError:
            return


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    runtime.initialize()
    try:
        respond, loaded = cli.responder_from_flags()
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    print(
        f"Chatting with {flags.FLAGS.checkpoint} ({loaded.config.num_params() / 1e6:.0f}M "
        f"parameters, {respond.chat_format.name} format). /reset starts over, /exit quits.",
        file=sys.stderr,
    )
    converse(respond, _typed_lines(), lambda s: print(s, end="", flush=True), _SYSTEM.value)


def run():
    """Console entry point."""
    cli.run(main, required=["checkpoint"])


if __name__ == "__main__":
    run()
