"""A decoder-only transformer in Flax NNX: Llama 2/3, Mistral, Qwen2/3, Gemma 1/2/3, SmolLM2,
Mixtral and Qwen3-MoE, by config.

Token embedding (optionally scaled by ``sqrt(d_model)``, Gemma), pre-norm blocks of grouped- or
multi-query attention (optional q/k/v bias, Qwen2; optional RMSNorm of each query and key head,
Qwen3 and Gemma 3; optional soft-capped scores, Gemma 2) and a gated MLP (SwiGLU or GeGLU) or a
mixture of such experts (`itune.model.moe`), RMSNorm (optionally scaling by ``1 + w``, Gemma),
optionally a second norm after attention and after the MLP (Gemma 2/3), rotary position
embedding (rotate-half, with Llama-3 or linear frequency scaling), layers that attend through a
sliding window, all of them or all but every n-th (Gemma 2/3, with their own RoPE base), and a
tied or separate output embedding, optionally soft-capped. Every parameter carries
logical axis names (``('embed', 'mlp')``...) as its ``out_sharding`` metadata; `itune.sharding`
turns those names into mesh axes through the rules in ``config.mesh``, so the model never names a
mesh axis.

The blocks' parameters are stacked along a leading ``'layers'`` axis. They run under
`jax.lax.scan` (compile time does not grow with depth) or, with ``scan_layers=False``, unrolled
over the same stacked parameters, so checkpoints do not depend on the choice.

Inputs are packed rows: ``tokens``, ``positions`` (restarting at 0 in each segment) and
``segment_ids`` (0 marks padding). A token attends only to earlier tokens of its own segment.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from itune.model import attention, context, lora, moe
from itune.model.config import MLP_ACTIVATION_NAMES, REMATS, ModelConfig
from itune.model.matmul import PROJECTION, matmul
from itune.sharding import LogicalRules, constrain

MLP_ACTIVATIONS = {
    "silu": jax.nn.silu,  # SwiGLU (Llama, Mistral, Qwen2).
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GeGLU (Gemma).
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
assert tuple(MLP_ACTIVATIONS) == MLP_ACTIVATION_NAMES


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """``cap * tanh(x / cap)``: ``x`` squashed into ``(-cap, cap)``; ``x`` itself for cap 0."""
    if not cap:
        return x
    return jnp.tanh(x / cap) * cap


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # The projections' float32 results (float32, as a stacked bfloat16 residual is rewritten
    # whole at every layer on XLA:CPU), and attention's output and log-sum-exp (its backward's
    # residuals: without them the backward would recompute attention's whole forward).
    "save_dots": jax.checkpoint_policies.save_only_these_names(
        PROJECTION, *attention.ATTENTION_RESIDUALS
    ),
    # The same values as save_dots, kept in the host's memory between the forward and the
    # backward (copied out and back by the compiler, overlapping the layers' compute): the
    # chip holds only a layer's worth of them. On CPU the host memory is the device's own,
    # so it compiles and computes as save_dots does.
    "offload_dots": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[PROJECTION, *attention.ATTENTION_RESIDUALS],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}
assert tuple(REMAT_POLICIES) == REMATS
# The remat values that move saved activations to `HOST_MEMORY`.
OFFLOADING_REMATS = ("offload_dots",)
HOST_MEMORY = "pinned_host"


def check_host_memory(remat: str, device: jax.Device | None = None) -> None:
    """Raises a ValueError when ``remat`` offloads to the host and ``device`` (default: the
    ambient mesh's first, else the default backend's) has no `HOST_MEMORY` space. Called while
    tracing, so a preflight for a TPU topology asks that topology's devices."""
    if remat not in OFFLOADING_REMATS:
        return
    if device is None:
        # The mesh of `jax.set_mesh` (its devices: `jax.sharding.get_mesh` refuses under jit).
        from jax._src.mesh import get_concrete_mesh

        mesh = get_concrete_mesh()
        device = mesh.devices.flat[0] if not mesh.empty else jax.devices()[0]
    kinds = [m.kind for m in device.addressable_memories()]
    if HOST_MEMORY not in kinds:
        raise ValueError(
            f"model.remat={remat!r} offloads activations to {HOST_MEMORY!r} memory, which "
            f"{device.platform} devices do not have (their memories: {kinds}); use "
            "model.remat='save_dots' or 'full'"
        )


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], dtype, axes: tuple[str | None, ...]):
    """A parameter annotated with logical axis names (mapped to mesh axes in `itune.sharding`)."""
    # eager_sharding=False: the names are logical, so Flax must not try to place them on a mesh.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """Root-mean-square norm in float32; scales by ``w`` or, with ``plus_one``, ``1 + w``."""

    def __init__(self, dim: int, eps: float, plus_one: bool, *, param_dtype, rngs: nnx.Rngs):
        self.eps, self.plus_one = eps, plus_one
        init = nnx.initializers.zeros if plus_one else nnx.initializers.ones
        self.scale = _param(rngs, init, (dim,), param_dtype, ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (normed * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs, dim: int | None = None) -> RMSNorm:
    p = jnp.dtype(cfg.param_dtype)
    return RMSNorm(dim or cfg.d_model, cfg.norm_eps, cfg.norm_plus_one, param_dtype=p, rngs=rngs)


class HeadNorm(RMSNorm):
    """RMSNorm over ``head_dim``, the same scale for every head (``qk_norm``)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        p = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.zeros if cfg.norm_plus_one else nnx.initializers.ones
        self.eps, self.plus_one = cfg.norm_eps, cfg.norm_plus_one
        self.scale = _param(rngs, init, (cfg.head_dim,), p, ("head_dim",))


def layer_flags(cfg: ModelConfig):
    """What tells the layers apart, per layer (scanned along with their parameters): whether
    each slides (see `ModelConfig.layer_is_sliding`); None when all layers are alike."""
    kinds = cfg.layer_is_sliding()
    return None if len(set(kinds)) <= 1 else jnp.asarray(kinds)


def _sliding(cfg: ModelConfig, flag) -> Any:
    """A layer's sliding flag: its scanned flag, or the one shared by all layers."""
    return bool(cfg.sliding_window) if flag is None else flag


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
        if cfg.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, zeros, (h, hd), p, ("heads", "head_dim"))
            self.k_bias = _param(rngs, zeros, (kv, hd), p, ("kv_heads", "head_dim"))
            self.v_bias = _param(rngs, zeros, (kv, hd), p, ("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = HeadNorm(cfg, rngs=rngs)
            self.k_norm = HeadNorm(cfg, rngs=rngs)

    def project(self, x, dropout_rng=None):
        """q, k, v ``[batch, length, heads, head_dim]`` before the rotary embedding."""
        dt = jnp.dtype(self.cfg.dtype)
        q = matmul("btd,dhk->bthk", x, self.q[...], dt)
        k = matmul("btd,dhk->bthk", x, self.k[...], dt)
        v = matmul("btd,dhk->bthk", x, self.v[...], dt)
        q = lora.apply(self, "q", x, q, dropout_rng)  # Each a no-op without its adapters.
        k = lora.apply(self, "k", x, k, dropout_rng)
        v = lora.apply(self, "v", x, v, dropout_rng)
        if self.cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _rotated(self, x, positions, sliding, dropout_rng=None):
        """q, k (rotated by RoPE: the sliding layers' own when they have one) and v."""
        cfg = self.cfg
        q, k, v = self.project(x, dropout_rng)
        frequencies = attention.rope_frequencies(cfg)
        scale = attention.rope_attention_factor(cfg)
        if cfg.rope_local_theta and cfg.sliding_window:
            local = attention.rope_frequencies(cfg, local=True)
            frequencies = jnp.where(sliding, local, frequencies)
            scale = jnp.where(sliding, 1.0, scale) if scale != 1.0 else scale
        q = attention.apply_rope(q, positions, frequencies, scale)
        k = attention.apply_rope(k, positions, frequencies, scale)
        return q, k, v

    def __call__(self, x, positions, segment_ids, sliding=False, dropout_rng=None):
        """``sliding``: whether this layer attends through the window (a Python bool, or a
        traced one when the layers differ and run under scan)."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q, k, v = self._rotated(x, positions, sliding, dropout_rng)
        q = constrain(
            q,
            ("activation_batch", "activation_length", "activation_heads", None),
            self.rules,
        )

        # The sequence split over devices: the row's keys and values gathered (`context`).
        parallel = bool(context.context_axes(self.rules))

        def attend(window):
            if parallel:
                return lambda: context.attend(
                    q,
                    k,
                    v,
                    segment_ids,
                    self.rules,
                    cfg.attention,
                    window,
                    _score_scale(cfg),
                    cfg.attn_logit_softcap,
                )
            return lambda: attention.attend(
                q,
                k,
                v,
                segment_ids,
                cfg.attention,
                window,
                _score_scale(cfg),
                cfg.attn_logit_softcap,
            )

        if isinstance(sliding, bool):
            out = attend(cfg.sliding_window if sliding else 0)()
        elif cfg.attention == "xla" or parallel:  # Layers differ: the mask takes each window.
            out = attend(jnp.where(sliding, cfg.sliding_window, 0))()
        else:  # The kernels take a fixed mask: each kind is compiled once, and runs on its layers.
            out = jax.lax.cond(sliding, attend(cfg.sliding_window), attend(0))
        y = matmul("bthk,hkd->btd", out, self.o[...], dt)
        return lora.apply(self, "o", out, y, dropout_rng)

    def cached(self, x, positions, cache: "LayerCache", write_index, sliding=False):
        """Attention of new tokens over a key/value cache; returns ``(output, updated cache)``.

        Row ``b``'s ``t`` new keys and values go into cache slots ``write_index[b]...``; a cache
        slot is a position, so a query at position ``p`` reads slots ``0..p`` and never the
        stale or padding slots after it.
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q, k, v = self._rotated(x, positions, sliding)
        rows = jnp.arange(x.shape[0])[:, None]
        slots = write_index[:, None] + jnp.arange(x.shape[1])[None, :]
        cache = LayerCache(
            cache.k.at[rows, slots].set(k.astype(cache.k.dtype), mode="drop"),
            cache.v.at[rows, slots].set(v.astype(cache.v.dtype), mode="drop"),
        )
        window = jnp.where(sliding, cfg.sliding_window, 0) if cfg.sliding_window else 0
        out = attention.cached_attention(
            q,
            cache.k,
            cache.v,
            positions,
            window,
            _score_scale(cfg),
            cfg.attn_logit_softcap,
        )
        y = matmul("bthk,hkd->btd", out, self.o[...], dt)
        return lora.apply(self, "o", out, y), cache


def _score_scale(cfg: ModelConfig) -> float:
    """What the scores q.k are multiplied by: ``query_pre_attn_scalar`` (or head_dim) ** -0.5."""
    return (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``, SwiGLU or GeGLU by ``mlp_activation``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p = jnp.dtype(cfg.param_dtype)
        d, m = cfg.d_model, cfg.mlp_dim
        self.gate = _param(rngs, nnx.initializers.normal(d**-0.5), (d, m), p, ("embed", "mlp"))
        self.up = _param(rngs, nnx.initializers.normal(d**-0.5), (d, m), p, ("embed", "mlp"))
        self.down = _param(rngs, nnx.initializers.normal(m**-0.5), (m, d), p, ("mlp", "embed"))

    def __call__(self, x, dropout_rng=None):
        dt = jnp.dtype(self.cfg.dtype)
        act = MLP_ACTIVATIONS[self.cfg.mlp_activation]
        gate = lora.apply(
            self, "gate", x, matmul("btd,dm->btm", x, self.gate[...], dt), dropout_rng
        )
        up = lora.apply(self, "up", x, matmul("btd,dm->btm", x, self.up[...], dt), dropout_rng)
        hidden = act(gate) * up
        return lora.apply(
            self,
            "down",
            hidden,
            matmul("btm,md->btd", hidden, self.down[...], dt),
            dropout_rng,
        )


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with ``post_norms``,
    each branch's output is normed again before it is added (Gemma 2/3). The MLP is a mixture
    of experts with ``num_experts``; the block then also returns its router's statistics."""

    def __init__(self, cfg: ModelConfig, rules: LogicalRules, *, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        self.attn_norm = _norm(cfg, rngs)
        self.attn = Attention(cfg, rules, rngs=rngs)
        if cfg.post_norms:
            self.attn_post_norm = _norm(cfg, rngs)
        self.mlp_norm = _norm(cfg, rngs)
        if cfg.num_experts:
            self.moe = moe.MoE(cfg, rules, rngs=rngs)
        else:
            self.mlp = MLP(cfg, rngs=rngs)
        if cfg.post_norms:
            self.mlp_post_norm = _norm(cfg, rngs)
        # After every base parameter, so that the base drawn from a seed is the same with LoRA.
        lora.add_adapters(self.attn, cfg, lora.ATTENTION_TARGETS, rngs)
        lora.add_adapters(self.moe if cfg.num_experts else self.mlp, cfg, lora.MLP_TARGETS, rngs)

    def _mlp_branch(self, x, segment_ids, dropout_rng=None):
        """``(x + mlp branch, router statistics or None)``."""
        if self.cfg.num_experts:
            out, stats = self.moe(self.mlp_norm(x), segment_ids, dropout_rng)
        else:
            out, stats = self.mlp(self.mlp_norm(x), dropout_rng), None
        if self.cfg.post_norms:
            out = self.mlp_post_norm(out)
        x = x + out
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"), self.rules)
        return x, stats

    def __call__(self, x, positions, segment_ids, sliding=False, dropout_rng=None):
        """``(output, router statistics or None)``."""
        attended = self.attn(self.attn_norm(x), positions, segment_ids, sliding, dropout_rng)
        if self.cfg.post_norms:
            attended = self.attn_post_norm(attended)
        return self._mlp_branch(x + attended, segment_ids, dropout_rng)

    def cached(self, x, positions, cache: "LayerCache", write_index, sliding=False):
        attended, cache = self.attn.cached(
            self.attn_norm(x), positions, cache, write_index, sliding
        )
        if self.cfg.post_norms:
            attended = self.attn_post_norm(attended)
        # Decoding has no padding tokens to leave out of the router statistics (unused).
        x, _ = self._mlp_branch(x + attended, jnp.ones(x.shape[:2], jnp.int32))
        return x, cache


class LayerCache(NamedTuple):
    """Keys and values ``[batch, cache_len, kv_heads, head_dim]`` by position (for all layers
    at once, a leading ``layers`` axis)."""

    k: jax.Array
    v: jax.Array


CACHE_AXES = ("layers", "activation_batch", "activation_length", None, None)


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
        self.final_norm = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                rngs,
                nnx.initializers.normal(cfg.d_model**-0.5),
                (cfg.d_model, cfg.vocab_size),
                p,
                ("embed", "vocab"),
            )

    def embed_tokens(self, tokens):
        dt = jnp.dtype(self.cfg.dtype)
        # Gather the whole table first: a lookup into a sharded table makes XLA replicate its output.
        table = constrain(self.embed[...], (None, None), self.rules)
        x = jnp.take(table, tokens, axis=0).astype(dt)
        if self.cfg.embed_scale:  # Gemma scales in the computation dtype.
            x = x * jnp.asarray(math.sqrt(self.cfg.d_model), dt)
        return constrain(
            x, ("activation_batch", "activation_length", "activation_embed"), self.rules
        )

    def hidden_states(self, tokens, positions, segment_ids, dropout_rng=None):
        """Final-norm hidden states ``[batch, length, d_model]`` in the computation dtype
        (`hidden_states_and_router` without the router statistics)."""
        return self.hidden_states_and_router(tokens, positions, segment_ids, dropout_rng)[0]

    def hidden_states_and_router(self, tokens, positions, segment_ids, dropout_rng=None):
        """``(hidden states, router statistics)``: final-norm hidden states ``[batch, length,
        d_model]`` in the computation dtype, and the `moe.RouterStats` summed over the layers
        (None without experts).

        ``dropout_rng``: a key for LoRA dropout (split over the layers); None: no dropout.

        The residual stream between the layers is float32 (each block computes in the
        computation dtype): the sum of 30 or 80 layers' outputs keeps its precision, and the
        backward's stack of layer inputs stays float32, which XLA:CPU updates in place where
        it would rewrite a whole bfloat16 stack at every layer."""
        cfg = self.cfg
        # Under context parallelism, rows in the load-balanced order (`context.balance`).
        shards = context.context_size(self.rules)
        if shards > 1:
            tokens, positions, segment_ids = (
                context.balance(a, shards) for a in (tokens, positions, segment_ids)
            )
        x = self.embed_tokens(tokens).astype(jnp.float32)
        graphdef, block_state = nnx.split(self.blocks)
        keys = None
        if dropout_rng is not None and cfg.lora_rank and cfg.lora_dropout > 0:
            keys = jax.random.split(dropout_rng, cfg.num_layers)
        flags = layer_flags(cfg)

        def layer(carry, xs):
            state, key, flag = xs
            block = nnx.merge(graphdef, state)
            return block(carry, positions, segment_ids, _sliding(cfg, flag), key)

        policy = REMAT_POLICIES[cfg.remat]
        check_host_memory(cfg.remat)
        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        if cfg.scan_layers:
            x, stats = jax.lax.scan(layer, x, (block_state, keys, flags))
            stats = None if stats is None else jax.tree.map(lambda s: jnp.sum(s, 0), stats)
        else:
            stats = None
            for i in range(cfg.num_layers):
                xs = jax.tree.map(lambda a: a[i], (block_state, keys))
                x, layer_stats = layer(x, (*xs, cfg.layer_is_sliding()[i]))
                if layer_stats is not None:
                    stats = (
                        layer_stats if stats is None else jax.tree.map(jnp.add, stats, layer_stats)
                    )
        hidden = self.final_norm(x).astype(cfg.dtype)
        if shards > 1:
            hidden = constrain(
                context.unbalance(hidden, shards),
                ("activation_batch", "activation_length", "activation_embed"),
                self.rules,
            )
        return hidden, stats

    def init_cache(self, batch: int, cache_len: int) -> LayerCache:
        """An empty key/value cache for ``batch`` rows of up to ``cache_len`` positions."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, cache_len, cfg.num_kv_heads, cfg.head_dim)
        zeros = constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), CACHE_AXES, self.rules)
        return LayerCache(zeros, zeros)

    def unstacked_layers(self) -> tuple[nnx.GraphDef, list[nnx.State]]:
        """The blocks' graph and each layer's parameters, sliced from the stacked ones.

        A decode loop slices them once, before it starts: in a loop over the stacked layers,
        every step would copy each layer's weights out of the stack again."""
        graphdef, state = nnx.split(self.blocks)
        return graphdef, [jax.tree.map(lambda a: a[i], state) for i in range(self.cfg.num_layers)]

    def cached_hidden_states(self, tokens, positions, cache, write_index, layers=None):
        """Final-norm hidden states of new ``tokens [batch, t]`` at ``positions``, attending to
        the cache and to each other; returns ``(hidden, cache with their keys and values)``.

        The prompt (prefill: ``write_index`` 0) and each decoded token go through here. With
        ``layers`` (`unstacked_layers`), ``cache`` is a tuple of one `LayerCache` per layer and
        the layers run unrolled."""
        cfg = self.cfg
        x = self.embed_tokens(tokens).astype(jnp.float32)  # As in `hidden_states`.
        if layers is not None:
            graphdef, states = layers
            updated = []
            for state, layer_cache, sliding in zip(
                states, cache, cfg.layer_is_sliding(), strict=True
            ):
                block = nnx.merge(graphdef, state)
                x, layer_cache = block.cached(x, positions, layer_cache, write_index, sliding)
                updated.append(layer_cache)
            return self.final_norm(x).astype(cfg.dtype), tuple(updated)
        graphdef, block_state = nnx.split(self.blocks)
        flags = layer_flags(cfg)

        def layer(carry, xs):
            state, layer_cache, flag = xs
            block = nnx.merge(graphdef, state)
            return block.cached(carry, positions, layer_cache, write_index, _sliding(cfg, flag))

        if cfg.scan_layers:
            x, cache = jax.lax.scan(layer, x, (block_state, cache, flags))
        else:
            updated = []
            for i in range(cfg.num_layers):
                xs = jax.tree.map(lambda a: a[i], (block_state, cache))
                x, layer_cache = layer(x, (*xs, cfg.layer_is_sliding()[i]))
                updated.append(layer_cache)
            cache = jax.tree.map(lambda *a: jnp.stack(a), *updated)
        cache = LayerCache(*(constrain(c, CACHE_AXES, self.rules) for c in cache))
        return self.final_norm(x).astype(self.cfg.dtype), cache

    def logits(self, hidden):
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            out = matmul("btd,vd->btv", hidden, self.embed[...], dt, jnp.float32)
        else:
            out = matmul("btd,dv->btv", hidden, self.lm_head[...], dt, jnp.float32)
        out = constrain(
            out,
            ("activation_batch", "activation_length", "activation_vocab"),
            self.rules,
        )
        return softcap(out.astype(jnp.float32), self.cfg.final_logit_softcap)

    def logits_from(self, hidden, weight):
        """`logits` from the `output_weight` ``[vocab, d_model]`` that `features` returned."""
        dt = jnp.dtype(self.cfg.dtype)
        out = matmul("btd,vd->btv", hidden, weight, dt, jnp.float32)
        out = constrain(
            out,
            ("activation_batch", "activation_length", "activation_vocab"),
            self.rules,
        )
        return softcap(out.astype(jnp.float32), self.cfg.final_logit_softcap)

    def output_weight(self) -> jax.Array:
        """The logits' projection ``[vocab, d_model]`` in the computation dtype."""
        weight = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...].T
        return weight.astype(self.cfg.dtype)

    def features(self, tokens, positions, segment_ids, dropout_rng=None):
        """`hidden_states` and `output_weight`, from which a loss computes the logits itself
        (soft-capped by ``final_logit_softcap``), and the router statistics (None without
        experts); with LoRA, as in ``__call__``."""
        model = lora.freeze_base(self) if self.cfg.lora_rank else self
        hidden, stats = model.hidden_states_and_router(tokens, positions, segment_ids, dropout_rng)
        return hidden, model.output_weight(), stats

    def __call__(self, tokens, positions, segment_ids, dropout_rng=None):
        """Logits; with LoRA, the base parameters enter through ``stop_gradient`` (only the
        adapters get gradients) and ``dropout_rng`` (a key, or None) drives LoRA dropout."""
        model = lora.freeze_base(self) if self.cfg.lora_rank else self
        return model.logits(model.hidden_states(tokens, positions, segment_ids, dropout_rng))
