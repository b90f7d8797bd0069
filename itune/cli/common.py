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


def define_model_flags() -> None:
    """Flags of the commands that answer prompts with a model: which model, and how to sample."""
    flags.DEFINE_string(
        "checkpoint",
        None,
        "The model: an itune model folder, a Hugging Face folder, a GGUF file or a training "
        "workdir (its last checkpoint).",
    )
    flags.DEFINE_string("chat_format", None, "Override the model's chat format.")
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
