"""What every command-line entry point shares: quiet start-up, ``--help`` that shows the
command's own flags and configs, and failures told in one line.

A command defines its flags, then hands its ``main`` to `run`:

  cli.run(main, required=["config", "workdir"])

`run` parses the flags (``--help`` prints `itune.cli.usage.help_text` and exits 0) and calls ``main``. A mistake
the user can fix (`itune.errors.UserError`, a file that cannot be read or written, a bad flag,
config or override, Ctrl-C) ends the program with ``<program>: <what, where, what to do>`` on
one line and status 1; ``--verbose`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import re
import sys
import types

from absl import app, flags
from ml_collections.config_flags import config_flags

from itune.cli import usage
from itune.errors import UserError

_VERBOSE = flags.DEFINE_bool("verbose", False, "On a failure, show the full traceback.")

# The messages of the errno values a user meets most, each with what to do.
_OS_PROBLEMS = {
    errno.ENOENT: "no such file or folder; check the path",
    errno.EACCES: "permission denied; check its permissions or choose another path",
    errno.EPERM: "operation not permitted; check its permissions or choose another path",
    errno.EROFS: "read-only file system; choose a writable path",
    errno.ENOSPC: "no space left on the device; free some space and start again",
    errno.EDQUOT: "disk quota exceeded; free some space and start again",
    errno.EEXIST: "already exists and is in the way; remove it or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder, not a file; give a file",
}
_HELP_ARGS = ("--help", "-help", "-h", "--h", "-?", "--?")


def quiet_tensorflow() -> None:
    """Call before TensorFlow is first imported: no banner, no oneDNN rewrites (TF only feeds
    data here)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@dataclasses.dataclass
class Command:
    """What a command's help and messages need: its module, name and positional arguments."""

    module: types.ModuleType
    args: str = ""  # Positional arguments in the usage line, e.g. "SRC DST".
    required: tuple[str, ...] = ()
    interrupted: str = "interrupted"  # The line that Ctrl-C ends the command with.

    @property
    def name(self) -> str:
        """``itune-train`` for ``itune.cli.train``, however the module was started."""
        spec = getattr(self.module, "__spec__", None)
        module_name = spec.name if spec is not None else self.module.__name__
        return "itune-" + module_name.rpartition(".")[2]

    def own_flags(self) -> list[flags.Flag]:
        """The flags the command's module defined, then the shared ones it uses."""
        by_module = flags.FLAGS.flags_by_module_id_dict()
        shared = by_module.get(id(sys.modules[__name__]), [])
        last = [f for f in shared if f.name == _VERBOSE.name]
        return by_module.get(id(self.module), []) + [f for f in shared if f not in last] + last


def run(main, *, required=(), args: str = "", interrupted: str = "interrupted") -> None:
    """Runs ``main(argv)`` as the console command of the module that defines ``main``.

    ``required`` names the flags that must be given; ``args`` the positional arguments shown in
    the usage line (``main`` checks their number); ``interrupted`` is the line that Ctrl-C
    (a `KeyboardInterrupt`) ends the command with.
    """
    command = Command(sys.modules[main.__module__], args, tuple(required), interrupted)
    if required:
        flags.mark_flags_as_required(list(required))

    def guarded(argv):
        with failures_told(command.name, lambda: _VERBOSE.value, command.interrupted):
            return main(argv)

    app.run(guarded, flags_parser=lambda argv: parse_flags(argv, command))


class failures_told:  # noqa: N801 - used as a context manager, like contextlib's.
    """Turns a user's mistake raised inside into ``<program>: <message>`` and exit status 1;
    ``verbose()`` true lets it through, traceback and all."""

    def __init__(self, program: str, verbose, interrupted: str = "interrupted"):
        self.program, self.verbose, self.interrupted = program, verbose, interrupted

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, SystemExit):
            return False
        message = self.interrupted if isinstance(error, KeyboardInterrupt) else describe(error)
        if message is None or self.verbose():
            return False
        print(f"{self.program}: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def describe(error: BaseException) -> str | None:
    """The one line that tells a user's mistake, or None for an error that is not one (a bug,
    which keeps its traceback).

    >>> describe(PermissionError(errno.EACCES, "Permission denied", "/runs/a"))
    '/runs/a: permission denied; check its permissions or choose another path'
    >>> describe(UserError("data.seq_len=0: must be positive"))
    'data.seq_len=0: must be positive'
    >>> describe(KeyboardInterrupt())
    'interrupted'
    >>> describe(ZeroDivisionError("division by zero")) is None
    True
    """
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, UserError):
        return _one_line(str(error))
    if isinstance(error, app.UsageError):
        return _one_line(f"{error}; see --help")
    if _is_tensorflow_file_error(error):  # tf.io.gfile's, for a file it could not use.
        return _one_line(f"{error.message}; check the path")
    if isinstance(error, OSError):
        if error.filename is None:  # A message of its own, e.g. FileNotFoundError("no GGUF...").
            problem = _OS_PROBLEMS.get(error.errno) or str(error)
            return _one_line(problem)
        where = str(error.filename)
        if error.filename2 is not None:
            where += f" -> {error.filename2}"
        problem = _OS_PROBLEMS.get(error.errno) or (error.strerror or str(error)).lower()
        return _one_line(f"{where}: {problem}")
    return None


def _is_tensorflow_file_error(error: BaseException) -> bool:
    tf_errors = sys.modules.get("tensorflow.python.framework.errors_impl")
    if tf_errors is None:  # TensorFlow never ran, so the error is not its.
        return False
    if isinstance(error, (tf_errors.NotFoundError, tf_errors.PermissionDeniedError)):
        return True
    return isinstance(error, tf_errors.FailedPreconditionError) and (
        "a directory" in error.message
    )


def check_output_folder(path: str, flag: str) -> None:
    """Raises a `UserError` unless ``path`` is a folder this process can write in, or can
    create: a command checks where it will write before it starts its work. A remote path
    (``gs://...``) is left to its file system.

    >>> check_output_folder(__file__, "workdir")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    itune.errors.UserError: --workdir=...common.py: a file, not a folder; choose a folder
    """
    if "://" in path:
        return
    where = f"--{flag}={path}"
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        if existing == os.path.abspath(path):
            raise UserError(f"{where}: a file, not a folder; choose a folder")
        raise UserError(f"{where}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{where}: cannot write in {existing} (permission denied); change its permissions "
            "or choose another path"
        )


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _verbose_in(argv: list[str]) -> bool:
    """Whether ``--verbose`` is on the command line, for failures before the flags are parsed."""
    return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=1") for a in argv[1:])


def parse_flags(argv: list[str], command: Command | None = None) -> list[str]:
    """Parses flags. ``--help`` prints `itune.cli.usage.help_text` and exits 0; a bad flag, config file, config
    argument or override ends the program with a one-line message and status 1."""
    command = command or Command(sys.modules["__main__"])
    args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if any(a in _HELP_ARGS for a in args):
        try:
            print(usage.help_text(command), flush=True)
        except BrokenPipeError:  # `itune-train --help | head`: the reader has all it wanted.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    for flag in command.own_flags():
        if usage.is_config_file_flag(flag):
            lock = getattr(flag.parser, "_lock_config", True)
            flag.parser = _ConfigFileParser(flag.name, lock, list(argv))
    with failures_told(command.name, lambda: _verbose_in(argv), command.interrupted):
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
            raise UserError(_flag_error_message(e)) from e


def _flag_error_message(error: Exception) -> str:
    """One line for absl's or ml_collections' complaint about a flag or an override."""
    message = str(error)
    # A misspelt override surfaces from ml_collections as the repr of a multi-line message.
    if len(message) > 1 and message[0] == message[-1] == "'":
        message = message[1:-1]
    message = _one_line(message.replace("\\'", "'").replace("\\n", " "))
    if isinstance(error, flags.UnrecognizedFlagError):
        owner = error.flagname.split(".", 1)[0]
        if "." in error.flagname and owner in flags.FLAGS:  # --config.x before any --config.
            return f"--{error.flagname}: an override needs --{owner}=FILE before it; see --help"
        close = re.search(r"Did you mean: (.*?) ?\?", message)
        hint = f"; did you mean --{close.group(1)}? See --help" if close else "; see --help"
        return f"unknown flag --{error.flagname}{hint}"
    if required := re.search(r"Flag --(\S+) must have a value other than None", message):
        return f"--{required.group(1)} is required; see --help"
    if bad := re.match(r"flag (--(\S+?)=.*?): (.*)", message):  # absl: flag --name=value: why
        flag, name, problem = bad.groups()
        kind = flags.FLAGS[name].flag_type() if name in flags.FLAGS else None
        expected = f"expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}: " if kind else ""
        return f"{flag}: {expected}{problem}; see --help"
    return f"{message}; see --help"


# ----------------------------------------------------------------------------- config files


class _ConfigFileParser(config_flags.ConfigFileFlagParser):
    """ml_collections' config file parser, with its failures told in one line: a missing file
    (naming the shipped configs), an argument the config rejects, an override of a field that
    does not exist. ``argv`` is the command line, whose overrides it checks."""

    def __init__(self, name: str, lock_config: bool, argv: list[str]):
        super().__init__(name, lock_config)
        self.argv = argv

    def parse(self, argument):
        where = f"--{self.name}={argument}"
        path = argument.split(":", 1)[0]
        if not os.path.isfile(path):
            known = ", ".join(c.path for c in usage.shipped_configs()) or "none"
            raise UserError(f"{where}: no such config file; the configs are: {known}")
        try:
            config = super().parse(argument)
        except (TypeError, ValueError) as e:
            # ml_collections re-raises get_config's error as a traceback in text.
            # A ValueError is get_config's word for an argument it rejects.
            cause = e.__context__ or e
            if isinstance(cause, (UserError, ValueError)):
                raise UserError(f"{where}: {cause}") from cause
            raise UserError(f"{where}: {type(cause).__name__}: {cause}") from cause
        if isinstance(config, config_flags._ErrorConfig):  # An IOError loading it, kept for later.
            cause = config._error
            raise UserError(f"{where}: cannot load it: {str(cause).splitlines()[0]}") from cause
        self._check_overrides(config, where)
        return config

    def _check_overrides(self, config, where: str) -> None:
        """Each ``--config.a.b`` of the command line names a field of ``config``."""
        for arg in self.argv[1:]:
            if arg == "--":
                break
            name = arg.lstrip("-").split("=", 1)[0]
            for prefix in (f"{self.name}.", f"no{self.name}."):
                if name.startswith(prefix):
                    _check_field(config, name[len(prefix) :], self.name, where)


def _check_field(config, path: str, flag: str, where: str) -> None:
    node, done = config, []
    for part in path.split("."):
        if not hasattr(node, "keys"):  # A list or a value: ml_collections judges the rest.
            return
        if part not in node:
            parent = ".".join([flag, *done])
            fields = sorted(node.keys())
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"did you mean --{parent}.{close[0]}? " if close else ""
            raise UserError(
                f"--{flag}.{path}: {parent} has no field {part!r} ({where}); {hint}"
                f"its fields: {', '.join(fields) or 'none'}"
            )
        node, done = node[part], done + [part]


# ------------------------------------------------------------------------ model commands


def define_chat_format_flag() -> None:
    """``--chat_format``, shared by the model commands and ``itune-inspect --model`` (defined once
    when one process imports several of them)."""
    if "chat_format" not in flags.FLAGS:
        flags.DEFINE_string(
            "chat_format",
            None,
            "Instead of the model's own chat template: a built-in format (chatml, llama3, gemma, "
            "mistral, alpaca) or a .jinja file.",
        )


def define_model_flags() -> None:
    """Flags of the commands that answer prompts with a model: which model, and how to sample."""
    flags.DEFINE_string(
        "checkpoint",
        None,
        "The model: an itune model folder, a Hugging Face folder, a GGUF file or a training "
        "workdir (its last checkpoint).",
    )
    define_chat_format_flag()
    flags.DEFINE_string(
        "dtype", None, "Computation dtype (float32, bfloat16); default: the model's."
    )
    flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate at most per answer.")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens only; 0: all.")
    flags.DEFINE_float("top_p", 1.0, "Sample from the top-p nucleus only; 1: all.")
    flags.DEFINE_integer("seed", 0, "Seed of the sampling.", lower_bound=0, upper_bound=2**32 - 1)
    flags.DEFINE_integer("batch_size", 32, "Prompts decoded together.")


def responder_from_flags():
    """The model named by the flags, loaded over all local devices, as an
    `itune.evaluation.responder.Responder`; returns ``(responder, loaded model)``."""
    import ml_collections  # noqa: PLC0415

    from itune import sharding  # noqa: PLC0415
    from itune.convert import model_dir  # noqa: PLC0415
    from itune.data import chat  # noqa: PLC0415
    from itune.evaluation import responder, sampler  # noqa: PLC0415

    f = flags.FLAGS
    sampling = sampler.SamplingConfig(
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_k=f.top_k,
        top_p=f.top_p,
        seed=f.seed,
    )
    mesh_config = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, strategy="fsdp"))
    mesh = sharding.make_mesh(mesh_config)
    rules = sharding.rules_from_config(mesh_config)
    overrides = {"dtype": f.dtype} if f.dtype else {}
    loaded = model_dir.load_model(f.checkpoint, mesh, rules, **overrides)
    fmt = chat.get_format(f.chat_format or loaded.chat_format or "chatml")
    if isinstance(fmt, chat.ChatTemplate) and not fmt.special_tokens:  # A --chat_format file.
        fmt = fmt.replace(special_tokens=chat.special_tokens_of(loaded.tokenizer))
    respond = responder.Responder(
        loaded.graphdef,
        loaded.params,
        loaded.tokenizer,
        fmt,
        sampling,
        batch_size=f.batch_size,
        mesh=mesh,
        rules=rules,
    )
    return respond, loaded
