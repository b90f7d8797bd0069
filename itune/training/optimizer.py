"""The optimizer and learning-rate schedule of ``config.optim``.

``make_optimizer(config.optim, num_steps)`` chains global-norm clipping and one of `OPTIMIZERS`,
whose (decoupled) weight decay skips norms, biases and the embedding table unless told otherwise
(`weight_decay_mask`). `OptimDefaults` is the one list of ``config.optim``'s fields and their
defaults: `itune.configlib.base_config` builds the section from it, and a field added after a
config was written is read with its default (`_field`), so older configs keep working.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import optax

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimDefaults:
    """The fields of ``config.optim``, each with its default."""

    name: str = "adamw"  # 'adamw', 'adafactor', 'lion' or 'sgd' (`OPTIMIZERS`).
    # After the warmup: 'cosine' or 'linear' decay to min_learning_rate_ratio of the peak at
    # num_steps, or 'constant' (`SCHEDULES`).
    schedule: str = "cosine"
    learning_rate: float = 1e-3  # Peak, reached after the warmup.
    warmup_steps: int = 50
    min_learning_rate_ratio: float = 0.1  # The decay ends at this share of the peak.
    b1: float = 0.9  # AdamW and Lion.
    b2: float = 0.95
    eps: float = 1e-8  # AdamW.
    momentum: float = 0.9  # SGD's momentum; 0: plain SGD.
    nesterov: bool = False  # SGD: Nesterov momentum.
    # Adafactor factors a second moment when the parameter's second-largest dimension is at
    # least this.
    adafactor_min_dim_to_factor: int = 128
    # Decoupled (lr * weight_decay * param per step), on matrices only unless decay_* say so.
    weight_decay: float = 0.1
    decay_norms: bool = False
    decay_biases: bool = False
    decay_embeddings: bool = False  # The (tied) embedding table; a separate lm_head decays.
    grad_clip_norm: float = 1.0  # Global-norm clipping; 0 disables it.


DEFAULTS = dataclasses.asdict(OptimDefaults())


def config_section() -> ml_collections.ConfigDict:
    """A new ``config.optim`` holding the defaults.

    >>> optim = config_section()
    >>> optim.name, optim.learning_rate, optim.grad_clip_norm
    ('adamw', 0.001, 1.0)
    """
    return ml_collections.ConfigDict(DEFAULTS)


def _field(optim_config: Any, name: str) -> Any:
    """``optim_config.name``, or its default in `DEFAULTS` when the config has no such field."""
    value = optim_config.get(name, None)
    return DEFAULTS[name] if value is None else value


def _choice(optim_config: Any, name: str, allowed: tuple[str, ...]) -> str:
    value = _field(optim_config, name)
    if value not in allowed:
        raise ValueError(f"optim.{name}={value!r}; expected one of {list(allowed)}")
    return value


def learning_rate_schedule(optim_config: Any, num_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then ``optim.schedule``: 'cosine' or 'linear' decay to
    ``min_learning_rate_ratio`` of the peak at ``num_steps``, or 'constant' at the peak.

    The warmup starts at ``peak / warmup_steps``, not 0, so that the first step is not wasted.
    """
    kind = _choice(optim_config, "schedule", SCHEDULES)
    peak = optim_config.learning_rate
    warmup = max(1, min(optim_config.warmup_steps, num_steps - 1))
    end = peak * optim_config.min_learning_rate_ratio
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=peak / warmup,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1),
            end_value=end,
        )
    after = (
        optax.linear_schedule(peak, end, transition_steps=max(1, num_steps - warmup))
        if kind == "linear"
        else optax.constant_schedule(peak)
    )
    return optax.join_schedules(
        [optax.linear_schedule(peak / warmup, peak, transition_steps=warmup), after], [warmup]
    )


def _path_names(path) -> list[str]:
    """``('blocks', 'attn', 'q')`` for the key path of an `nnx.State` leaf (or of a plain dict)."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return names[:-1] if names and names[-1] == "value" else names


def parameter_kind(names: list[str]) -> str:
    """'norm', 'bias', 'embedding' or 'matrix' for a parameter's path names.

    Norm scales are ``*norm/scale``, biases end in ``_bias``, the token embedding table is
    ``embed``; everything else (attention and MLP weights, a separate ``lm_head``, LoRA
    ``*_lora_a`` and ``*_lora_b``) is a matrix. Shapes do not decide: stacked layers give norms
    and biases a leading layer axis.
    """
    leaf = names[-1] if names else ""
    if leaf.endswith(("_lora_a", "_lora_b")):
        return "matrix"
    if leaf == "scale" or any(name.endswith("norm") for name in names):
        return "norm"
    if leaf == "bias" or leaf.endswith("_bias"):
        return "bias"
    if leaf in ("embed", "embedding"):
        return "embedding"
    return "matrix"


def weight_decay_mask(
    params: Any,
    decay_norms: bool = False,
    decay_biases: bool = False,
    decay_embeddings: bool = False,
) -> Any:
    """True where weight decay applies: matrices always; norms, biases and the embedding table
    only when asked."""
    decays = {
        "matrix": True,
        "norm": decay_norms,
        "bias": decay_biases,
        "embedding": decay_embeddings,
    }
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays[parameter_kind(_path_names(path))], params
    )


def _adafactor(optim_config, schedule, weight_decay, mask) -> optax.GradientTransformation:
    """Adafactor (factored second moments, update clipping, steps relative to the parameters'
    scale) with AdamW-style decoupled weight decay: ``-lr * (update + weight_decay * param)``.

    `optax.adafactor` would apply ``weight_decay_rate`` without the learning rate.
    """
    return optax.chain(
        optax.scale_by_factored_rms(
            min_dim_size_to_factor=_field(optim_config, "adafactor_min_dim_to_factor")
        ),
        optax.clip_by_block_rms(1.0),
        optax.scale_by_param_block_rms(),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(schedule),
    )


def _sgd(optim_config, schedule, weight_decay, mask) -> optax.GradientTransformation:
    """SGD with (optionally Nesterov) momentum and decoupled weight decay."""
    momentum = _field(optim_config, "momentum")
    parts = [optax.trace(momentum, nesterov=_field(optim_config, "nesterov"))] if momentum else []
    parts += [optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)


def make_optimizer(optim_config: Any, num_steps: int) -> optax.GradientTransformation:
    """``optim.name`` on the `learning_rate_schedule`, after global-norm clipping (unless
    ``grad_clip_norm`` is 0), with weight decay masked by `weight_decay_mask`."""
    name = _choice(optim_config, "name", OPTIMIZERS)
    schedule = learning_rate_schedule(optim_config, num_steps)
    mask = functools.partial(
        weight_decay_mask,
        decay_norms=bool(_field(optim_config, "decay_norms")),
        decay_biases=bool(_field(optim_config, "decay_biases")),
        decay_embeddings=bool(_field(optim_config, "decay_embeddings")),
    )
    weight_decay = optim_config.weight_decay
    if name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=weight_decay,
            mask=mask,
        )
    elif name == "lion":
        tx = optax.lion(
            schedule, b1=optim_config.b1, b2=optim_config.b2, weight_decay=weight_decay, mask=mask
        )
    elif name == "adafactor":
        tx = _adafactor(optim_config, schedule, weight_decay, mask)
    else:
        tx = _sgd(optim_config, schedule, weight_decay, mask)
    if optim_config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), tx)
    return tx


def make_model_optimizer(
    optim_config: Any, num_steps: int, model_config: Any
) -> optax.GradientTransformation:
    """`make_optimizer` for a model: with LoRA (``model.lora_rank > 0``), on the adapters only,
    with no optimizer state for the frozen base."""
    tx = make_optimizer(optim_config, num_steps)
    if getattr(model_config, "lora_rank", 0):
        from itune.model import lora  # noqa: PLC0415

        return lora.optimizer(tx)
    return tx
