"""The optimizer and learning-rate schedule of ``config.optim``."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(optim_config: Any, num_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to ``min_learning_rate_ratio`` of it.

    The warmup starts at ``peak / warmup_steps``, not 0, so that the first step is not wasted.
    """
    peak = optim_config.learning_rate
    warmup = max(1, min(optim_config.warmup_steps, num_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=peak / warmup,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=peak * optim_config.min_learning_rate_ratio,
    )


def weight_decay_mask(params: Any) -> Any:
    """Decay matrices only: norms (1-D per layer) and the embedding table are left alone."""

    def decays(path, value):
        names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
        return "embed" not in names and "scale" not in names and value.ndim >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_config: Any, num_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and the warmup-cosine schedule."""
    schedule = learning_rate_schedule(optim_config, num_steps)
    adamw = optax.adamw(
        schedule,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
        weight_decay=optim_config.weight_decay,
        mask=weight_decay_mask,
    )
    if optim_config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), adamw)
    return adamw
