"""A LLaMA-family decoder in Flax NNX.

Token embedding, pre-norm blocks of grouped-query attention and a SwiGLU MLP, RMSNorm, rotary
position embedding, and an optional tied output embedding. Every parameter carries logical axis
names (``('embed', 'mlp')``...) as its ``out_sharding`` metadata; `itune.sharding` turns those
names into mesh axes through the rules in ``config.mesh``, so the model never names a mesh axis.

The blocks are stacked along a leading ``'layers'`` axis and run under `jax.lax.scan`, so compile
time does not grow with depth.

Inputs are packed rows: ``tokens``, ``positions`` (restarting at 0 in each segment) and
``segment_ids`` (0 marks padding). A token attends only to earlier tokens of its own segment.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from itune.model import attention
from itune.sharding import LogicalRules, constrain


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder (built from ``config.model``)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"  # Computation dtype; softmax and the loss always run in float32.
    remat: str = "none"  # 'none' | 'full' | 'save_dots'

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"model.remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}"
            )

    @classmethod
    def from_config(cls, model_config: Any, vocab_size: int | None = None) -> "ModelConfig":
        """Builds from a ``config.model`` section; ``vocab_size`` fills a 0 there (from the tokenizer)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(model_config).items() if k in fields}
        if not values.get("vocab_size"):
            if not vocab_size:
                raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary size was given")
            values["vocab_size"] = vocab_size
        return cls(**values)

    def num_params(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        block = attn + 3 * self.d_model * self.mlp_dim + 2 * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.num_layers * block + self.vocab_size * self.d_model + head + self.d_model


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], dtype, axes: tuple[str | None, ...]):
    """A parameter annotated with logical axis names (mapped to mesh axes in `itune.sharding`)."""
    # eager_sharding=False: the names are logical, so Flax must not try to place them on a mesh.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):

    def __init__(self, cfg: ModelConfig, rules: LogicalRules, *, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        p = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(cfg.d_model**-0.5)
        out_init = nnx.initializers.normal((cfg.num_heads * cfg.head_dim) ** -0.5)
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = _param(rngs, init, (d, h, hd), p, ("embed", "heads", "head_dim"))
        self.k = _param(rngs, init, (d, kv, hd), p, ("embed", "kv_heads", "head_dim"))
        self.v = _param(rngs, init, (d, kv, hd), p, ("embed", "kv_heads", "head_dim"))
        self.o = _param(rngs, out_init, (h, hd, d), p, ("heads", "head_dim", "embed"))

    def __call__(self, x, positions, segment_ids):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q = jnp.einsum("btd,dhk->bthk", x, self.q[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dt))
        q = constrain(
            q, ("activation_batch", "activation_length", "activation_heads", None), self.rules
        )
        q = attention.apply_rope(q, positions, cfg.rope_theta)
        k = attention.apply_rope(k, positions, cfg.rope_theta)
        out = attention.dot_product_attention(q, k, v, segment_ids)
        return jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(dt))


class MLP(nnx.Module):

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p = jnp.dtype(cfg.param_dtype)
        d, m = cfg.d_model, cfg.mlp_dim
        self.gate = _param(rngs, nnx.initializers.normal(d**-0.5), (d, m), p, ("embed", "mlp"))
        self.up = _param(rngs, nnx.initializers.normal(d**-0.5), (d, m), p, ("embed", "mlp"))
        self.down = _param(rngs, nnx.initializers.normal(m**-0.5), (m, d), p, ("mlp", "embed"))

    def __call__(self, x):
        dt = jnp.dtype(self.cfg.dtype)
        hidden = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return hidden @ self.down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rules: LogicalRules, *, rngs: nnx.Rngs):
        p = jnp.dtype(cfg.param_dtype)
        self.rules = rules
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=p, rngs=rngs)
        self.attn = Attention(cfg, rules, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=p, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(
            x, ("activation_batch", "activation_length", "activation_embed"), self.rules
        )


class Decoder(nnx.Module):
    """Decoder-only transformer; ``__call__`` returns float32 logits ``[batch, length, vocab]``."""

    def __init__(self, cfg: ModelConfig, rules: LogicalRules = (), *, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        p = jnp.dtype(cfg.param_dtype)
        self.embed = _param(
            rngs,
            nnx.initializers.normal(cfg.d_model**-0.5),
            (cfg.vocab_size, cfg.d_model),
            p,
            ("vocab", "embed"),
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rules, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=p, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                rngs,
                nnx.initializers.normal(cfg.d_model**-0.5),
                (cfg.d_model, cfg.vocab_size),
                p,
                ("embed", "vocab"),
            )

    def hidden_states(self, tokens, positions, segment_ids):
        """Final-norm hidden states ``[batch, length, d_model]`` in the computation dtype."""
        dt = jnp.dtype(self.cfg.dtype)
        # Gather the whole table first: a lookup into a sharded table makes XLA replicate its output.
        table = constrain(self.embed[...], (None, None), self.rules)
        x = jnp.take(table, tokens, axis=0).astype(dt)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"), self.rules)
        graphdef, block_state = nnx.split(self.blocks)

        def layer(carry, state):
            return nnx.merge(graphdef, state)(carry, positions, segment_ids), None

        policy = REMAT_POLICIES[self.cfg.remat]
        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(layer, x, block_state)
        return self.final_norm(x)

    def logits(self, hidden):
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            out = jnp.einsum("btd,vd->btv", hidden, self.embed[...].astype(dt))
        else:
            out = hidden @ self.lm_head[...].astype(dt)
        out = constrain(
            out, ("activation_batch", "activation_length", "activation_vocab"), self.rules
        )
        return out.astype(jnp.float32)

    def __call__(self, tokens, positions, segment_ids):
        return self.logits(self.hidden_states(tokens, positions, segment_ids))
