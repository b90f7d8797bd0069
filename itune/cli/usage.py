"""What ``--help`` shows: a command's usage, its docstring and its own flags and, for a
command that takes a config, the configs shipped in ``configs/`` (read without running them),
the arguments each takes and how to override a field.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import textwrap

from absl import flags
from ml_collections.config_flags import config_flags

_WIDTH = 100


def is_config_file_flag(flag: flags.Flag) -> bool:
    """Whether ``flag`` is a ``config_flags.DEFINE_config_file`` flag."""
    return isinstance(flag.parser, config_flags.ConfigFileFlagParser)


def configs_dir() -> str:
    """The ``configs/`` folder shipped beside the ``itune`` package."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(package), "configs")


def _display_path(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


@dataclasses.dataclass
class ConfigFile:
    """A config file of ``configs/``: its path, what it is, and the arguments it takes."""

    path: str
    summary: str
    arguments: dict  # Name -> default, as `itune.configlib.parse_arg` takes them.


def shipped_configs() -> list[ConfigFile]:
    """The config files in `configs_dir`, read without running them."""
    folder = configs_dir()
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    found = []
    for name in names:
        if name.endswith(".py") and not name.startswith("_"):
            found.append(read_config_file(os.path.join(folder, name)))
    return found


def read_config_file(path: str) -> ConfigFile:
    """A config file's docstring's first sentence and its ``get_config`` arguments.

    The arguments are the keywords of the `itune.configlib.parse_arg` call in ``get_config``.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    doc = (ast.get_docstring(tree) or "").split("\n\n")[0]
    summary = " ".join(doc.replace("``", "").split())
    arguments = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "get_config":
            for call in ast.walk(node):
                if (
                    isinstance(call, ast.Call)
                    and getattr(call.func, "attr", getattr(call.func, "id", None)) == "parse_arg"
                ):
                    for keyword in call.keywords:
                        try:
                            value = ast.literal_eval(keyword.value)
                        except ValueError:
                            value = ast.unparse(keyword.value)
                        arguments[keyword.arg] = value
    return ConfigFile(_display_path(path), summary, arguments)


def _argument_text(arguments: dict) -> str:
    return ",".join(k if v is False else f"{k}={v}" for k, v in arguments.items())


def help_text(command) -> str:
    """The ``--help`` of ``command`` (an `itune.cli.common.Command`): usage, its docstring, its flags and, for a command that
    takes a config, the shipped configs and how to change them."""
    own = command.own_flags()
    usage = [command.name]
    usage += [_flag_synopsis(f) for f in own if f.name in command.required]
    usage += [command.args] if command.args else []
    usage.append("[flags]")
    doc = (command.module.__doc__ or "").replace("``", "").strip()
    lines = ["usage: " + " ".join(usage), "", doc, "", "flags:"]
    for flag in own:
        lines.append("  " + _flag_synopsis(flag))
        lines += textwrap.wrap(
            _flag_description(flag, command.required),
            _WIDTH,
            initial_indent="      ",
            subsequent_indent="      ",
        )
    config_flag = next((f for f in own if is_config_file_flag(f)), None)
    if config_flag is not None:
        lines += ["", *_configs_help(command.name, config_flag.name)]
    lines += ["", "--helpfull also lists the flags of absl (logging, debugging)."]
    return "\n".join(lines)


def _flag_synopsis(flag: flags.Flag) -> str:
    if flag.boolean:
        return f"--[no]{flag.name}"
    if is_config_file_flag(flag):
        return f"--{flag.name}=FILE[:ARGS]"
    values = getattr(flag.parser, "enum_values", None)
    if values:
        return f"--{flag.name}={{{','.join(values)}}}"
    kind = {"int": "N", "float": "X", "comma separated list of strings": "A,B,..."}
    placeholder = kind.get(flag.flag_type(), "TEXT")
    if placeholder == "TEXT" and flag.name.endswith("dir"):
        placeholder = "DIR"
    elif placeholder == "TEXT" and flag.name.endswith(("file", "checkpoint", "output")):
        placeholder = "PATH"
    return f"--{flag.name}={placeholder}"


def _flag_description(flag: flags.Flag, required) -> str:
    text = re.sub(r"^<[^>]*>: ", "", flag.help)  # absl's list of an enum's values.
    # absl appends its own sentence to a repeatable flag's help.
    text = re.sub(r";?\s*repeat this option to specify a list of values$", "", text)
    if isinstance(flag, flags.MultiFlag):
        text += " Repeatable."
    if flag.name in required:
        text += " (required)"
    elif flag.boolean:
        text += f" (default: {'on' if flag.default else 'off'})"
    elif flag.default not in (None, "", []):
        default = ",".join(flag.default) if isinstance(flag.default, list) else flag.default
        text += f" (default: {default})"
    return text


def _example_arguments(arguments: dict) -> str:
    """A switch (other than ``runlocal``, when there is one) and a key=value of ``arguments``."""
    switches = [k for k, v in arguments.items() if v is False]
    values = [f"{k}={v}" for k, v in arguments.items() if v is not False]
    switches = [k for k in switches if k != "runlocal"] or switches
    return ",".join(switches[:1] + values[:1])


def _configs_help(program: str, name: str) -> list[str]:
    lines = [f"configs (--{name}=FILE, or FILE:ARGS to pass it arguments):"]
    example, most = None, 0
    for config in shipped_configs():
        lines.append(f"  {config.path}")
        lines += textwrap.wrap(
            config.summary, _WIDTH, initial_indent="      ", subsequent_indent="      "
        )
        if config.arguments:
            listed = _argument_text(config.arguments).replace(",", ", ")
            lines.append(f"      arguments: {listed}")
            if len(config.arguments) > most:
                most = len(config.arguments)
                example = f"{config.path}:{_example_arguments(config.arguments)}"
    text = [
        "A config's arguments follow a colon, comma-separated: switches by name, values as "
        + (f"key=value, e.g. --{name}={example}." if example else "key=value."),
        f"--{name}.FIELD=VALUE overrides one field of the config; every field, with what it "
        "means, is in itune/configlib.py (base_config). E.g.:",
    ]
    lines.append("")
    for paragraph in text:
        lines += textwrap.wrap(paragraph, _WIDTH)
    lines.append(
        f"  {program} --{name}=configs/smoke.py --{name}.train.num_steps=10 "
        f"--{name}.optim.learning_rate=3e-3 ..."
    )
    return lines
