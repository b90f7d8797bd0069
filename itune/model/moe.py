"""Mixture-of-experts MLP: a float32 router picks ``k`` experts per token, dropless.

Each token's hidden state goes to its ``experts_per_token`` experts (top-k of the router's
softmax, optionally renormalised over the chosen ones: Mixtral, Qwen3-MoE's ``norm_topk_prob``);
each expert is a gated MLP (``down(act(gate(x)) * up(x))``) and the token's output is the
weighted sum of its experts' outputs. No token is ever dropped: the token-expert assignments
are sorted by expert and each expert's rows run as one group of a grouped matrix product
(`grouped_matmul`), so the work is that of the chosen experts only, never of all of them and
never a one-hot dispatch tensor of tokens x experts x capacity.

The router's statistics (`RouterStats`) leave each layer for the auxiliary losses of
`router_losses`: transformers' load-balancing loss (``router_aux_loss_coef``) and the router
z-loss of ST-MoE (``router_z_loss_coef``).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from itune import sharding
from itune.model import lora

if TYPE_CHECKING:
    from itune.model.config import ModelConfig

MATMULS = ("auto", "ragged", "tiled", "dense")
# Rows of one tile of `tiled_matmul`: each expert's group is padded to a multiple of it.
TILE = 64
# The experts' parameters: the gated MLP's projections and their adapters when LoRA is on.
EXPERT_PARAMS = tuple(
    f"{target}{part}" for target in ("gate", "up", "down") for part in ("", "_lora_a", "_lora_b")
)


class RouterStats(NamedTuple):
    """One layer's router sums over its non-padding tokens (summed again over layers)."""

    tokens: jax.Array  # [] how many tokens were routed
    chosen: jax.Array  # [k, experts] how many tokens chose each expert as their j-th
    probability: jax.Array  # [experts] the router's probabilities, summed over tokens
    z: jax.Array  # [] squared log-sum-exp of the router logits, summed over tokens

    @staticmethod
    def zeros(cfg: ModelConfig) -> "RouterStats":
        k, e = cfg.experts_per_token, cfg.num_experts
        return RouterStats(jnp.zeros(()), jnp.zeros((k, e)), jnp.zeros((e,)), jnp.zeros(()))


def router_losses(cfg: ModelConfig, stats: RouterStats) -> dict[str, jax.Array]:
    """``{'router_aux_loss', 'router_z_loss'}`` from the statistics summed over all layers.

    The load-balancing loss is transformers' ``load_balancing_loss_func`` over every layer's
    router logits at once: ``experts * sum_j,e f[j, e] * P[e]``, ``f`` the fraction of tokens
    choosing expert ``e`` as their ``j``-th and ``P`` the mean router probability (both over
    all layers' non-padding tokens). The z-loss is the mean squared log-sum-exp of the logits.
    """
    tokens = jnp.maximum(stats.tokens, 1.0)
    fraction = stats.chosen / tokens
    probability = stats.probability / tokens
    aux = cfg.num_experts * jnp.sum(fraction * probability[None, :])
    return {"router_aux_loss": aux, "router_z_loss": stats.z / tokens}


def grouped_matmul(x, w, group_sizes, implementation: str):
    """``x [rows, in]`` sorted by group, ``w [groups, in, out]``, ``group_sizes [groups]``
    (summing to at most ``rows``) -> ``[rows, out]``: row ``i`` of group ``g`` times ``w[g]``.
    Rows past the groups' total come out as zeros. ``'auto'`` picks by the platform the program
    is compiled for (not the host's: an ahead-of-time TPU compile on a CPU host gets ragged):
    `tiled_matmul` on CPU, ``jax.lax.ragged_dot`` elsewhere."""
    if implementation == "ragged":
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    if implementation == "tiled":
        return tiled_matmul(x, w, group_sizes)
    if implementation == "auto":
        return jax.lax.platform_dependent(
            x,
            w,
            group_sizes,
            cpu=tiled_matmul,
            default=functools.partial(grouped_matmul, implementation="ragged"),
        )
    raise ValueError(f"grouped_matmul: implementation {implementation!r}")


def tiled_matmul(x, w, group_sizes, tile: int = TILE):
    """`grouped_matmul` as one batched product over tiles of ``tile`` rows, each tile holding
    rows of one group only (each group padded to whole tiles): work and memory grow with the
    rows and tiles, not with rows x groups (XLA:CPU computes ``ragged_dot`` for every group)."""
    rows, groups = x.shape[0], w.shape[0]
    num_tiles = -(-rows // tile) + groups  # Padding adds less than one tile per group.
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    padded_sizes = -(-group_sizes // tile) * tile
    padded_ends = jnp.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes
    row = jnp.arange(rows)
    row_group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), groups - 1)
    in_groups = row < ends[-1]
    slot = padded_starts[row_group] + row - starts[row_group]
    slot = jnp.where(in_groups, slot, num_tiles * tile)  # Out of range: dropped.
    # Each slot's row (out of range for padding): rows and slots map one to one.
    slot_row = jnp.full((num_tiles * tile,), rows, slot.dtype).at[slot].set(row, mode="drop")
    padded = _take(x, slot_row, slot)
    tile_group = jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right")
    tile_w = w[jnp.minimum(tile_group, groups - 1)]  # Tiles past the groups hold zeros.
    out = jnp.einsum(
        "tnd,tdm->tnm",
        padded.reshape(num_tiles, tile, -1),
        tile_w,
        preferred_element_type=jnp.float32,
    ).reshape(num_tiles * tile, -1)
    return _take(out, slot, slot_row)  # Rows past the groups: zeros.


@jax.custom_vjp
def _take(x, index, inverse):
    """``x[index]``, zero where ``index`` is out of range; ``index`` and ``inverse`` map the
    rows they keep one to one (``x[index][inverse] == x`` on those), so the gradient is a
    gather by ``inverse`` as well (XLA:CPU runs a gather much faster than a scatter)."""
    return x.at[index].get(mode="fill", fill_value=0)


def _take_fwd(x, index, inverse):
    return _take(x, index, inverse), (index, inverse)


def _take_bwd(residuals, g):
    index, inverse = residuals
    return _take(g, inverse, index), None, None


_take.defvjp(_take_fwd, _take_bwd)


def _activation(cfg: ModelConfig):
    from itune.model.decoder import MLP_ACTIVATIONS  # noqa: PLC0415

    return MLP_ACTIVATIONS[cfg.mlp_activation]


class ExpertLayout(NamedTuple):
    """How `expert_outputs` runs under ``jax.shard_map`` when the experts are split over mesh
    axes (expert parallelism): each device holds ``experts / expert_shards`` whole experts."""

    token_specs: tuple[
        PartitionSpec, ...
    ]  # Of the tokens [b, t, d], weights and experts [b, t, k].
    param_specs: dict[str, PartitionSpec]
    expert_axes: tuple[str, ...]  # The mesh axes the experts are split over.
    expert_shards: int
    gather_axes: tuple[
        str, ...
    ]  # Expert axes that also split the tokens: gathered, then scattered.
    sum_axes: tuple[str, ...]  # Axes whose devices hold partial outputs of the same tokens.


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_layout(
    cfg: ModelConfig, rules: sharding.LogicalRules, batch: int, length: int, variables: dict
) -> ExpertLayout | None:
    """The `ExpertLayout` of the ambient mesh and ``rules``, or None where the rules keep each
    expert on every device (the experts then run under the compiler's own partitioning)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None
    expert_axes = _axes(sharding.logical_to_spec(("expert",), rules, (cfg.num_experts,), mesh)[0])
    if not expert_axes:
        return None
    token_spec = sharding.logical_to_spec(
        ("activation_batch", "activation_length"), rules, (batch, length), mesh
    )
    token_axes = {a for entry in token_spec for a in _axes(entry)}
    # A mesh axis that splits the tokens cannot also split an expert's hidden units.
    mlp_axes = tuple(
        a
        for a in _axes(sharding.logical_to_spec(("mlp",), rules, (cfg.mlp_dim,), mesh)[0])
        if a not in token_axes and a not in expert_axes
    )
    by_name = {"expert": expert_axes or None, "mlp": mlp_axes or None}

    def param_spec(variable):
        names = tuple(variable.get_metadata().get("out_sharding") or ())
        names = names[len(names) - variable.ndim :] if names else (None,) * variable.ndim
        return PartitionSpec(*(by_name.get(name) for name in names))

    return ExpertLayout(
        token_specs=(
            PartitionSpec(*token_spec, None),
            PartitionSpec(*token_spec, None),
            PartitionSpec(*token_spec, None),
        ),
        param_specs={name: param_spec(v) for name, v in variables.items()},
        expert_axes=expert_axes,
        expert_shards=math.prod(mesh.shape[a] for a in expert_axes),
        gather_axes=tuple(a for a in expert_axes if a in token_axes),
        sum_axes=tuple(a for a in expert_axes if a not in token_axes) + mlp_axes,
    )


def expert_outputs(
    cfg: ModelConfig,
    implementation: str,
    x,
    weights,
    experts,
    params: dict[str, Any],
    *,
    dropout_rng=None,
    layout: ExpertLayout | None = None,
):
    """The weighted sum of each token's chosen experts, ``[b, t, d]`` in float32, from tokens
    ``x [b, t, d]`` and their router ``weights`` and ``experts [b, t, k]``.

    The token-expert assignments are sorted by expert and each expert's rows run as one group of
    `grouped_matmul`. Under a ``layout`` (inside ``jax.shard_map``), a device gathers the tokens
    of the devices that share its experts' axes, runs the assignments to its own experts (the
    others sort last and come out as zeros: no token is dropped, whatever the routing), and the
    partial outputs are summed back onto the devices the tokens came from.
    """
    dt = jnp.dtype(cfg.dtype)
    b, t, d = x.shape
    k = cfg.experts_per_token
    tokens, weights, experts = x.reshape(b * t, d), weights.reshape(-1, k), experts.reshape(-1, k)
    num_local, first = cfg.num_experts, 0
    if layout is not None:
        if layout.gather_axes:
            tokens, weights, experts = (
                jax.lax.all_gather(a, layout.gather_axes, tiled=True)
                for a in (tokens, weights, experts)
            )
        num_local = cfg.num_experts // layout.expert_shards
        first = jax.lax.axis_index(layout.expert_axes) * num_local
        # Each device's rows differ along every axis that splits its experts' weights: typed so,
        # the transposes (`_take`'s own included) sum the tokens' gradients over those axes.
        missing = tuple(
            a for a in layout.sum_axes if a not in jax.typeof(tokens).manual_axis_type.varying
        )
        if missing:
            tokens = jax.lax.pcast(tokens, missing, to="varying")
    local = experts.reshape(-1) - first
    group = jnp.where((local >= 0) & (local < num_local), local, num_local)
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=num_local + 1)[:num_local].astype(jnp.int32)
    rows = tokens.astype(dt)[order // k]  # [n * k, d], grouped by expert

    def matmul(inputs, w, group_sizes):
        return grouped_matmul(inputs, w, group_sizes, implementation)

    def project(name, inputs):
        y = matmul(inputs, params[name].astype(dt), sizes).astype(dt)
        a, b = params.get(f"{name}_lora_a"), params.get(f"{name}_lora_b")
        return lora.apply_grouped(cfg, name, a, b, inputs, y, sizes, matmul, dropout_rng)

    hidden = _activation(cfg)(project("gate", rows)) * project("up", rows)
    out_rows = project("down", hidden)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    per_choice = out_rows[inverse].reshape(-1, k, d).astype(jnp.float32)
    out = jnp.einsum("nkd,nk->nd", per_choice, weights)
    if layout is not None:
        if layout.gather_axes:
            out = jax.lax.psum_scatter(out, layout.gather_axes, scatter_dimension=0, tiled=True)
        if layout.sum_axes:
            out = jax.lax.psum(out, layout.sum_axes)
    return out.reshape(b, t, d)


class MoE(nnx.Module):
    """The experts' gated MLPs and their router (parameters stacked over experts)."""

    def __init__(self, cfg: ModelConfig, rules: sharding.LogicalRules = (), *, rngs: nnx.Rngs):
        from itune.model.decoder import _param  # noqa: PLC0415  (decoder imports this module)

        self.cfg, self.rules = cfg, rules
        p = jnp.dtype(cfg.param_dtype)
        d, m, e = cfg.d_model, cfg.mlp_dim, cfg.num_experts
        normal = nnx.initializers.normal
        self.router = _param(rngs, normal(d**-0.5), (d, e), p, ("embed", None))
        self.gate = _param(rngs, normal(d**-0.5), (e, d, m), p, ("expert", "embed", "mlp"))
        self.up = _param(rngs, normal(d**-0.5), (e, d, m), p, ("expert", "embed", "mlp"))
        self.down = _param(rngs, normal(m**-0.5), (e, m, d), p, ("expert", "mlp", "embed"))

    def route(self, x, segment_ids):
        """``(weights [n, k], experts [n, k], RouterStats)`` of tokens ``x [n, d]``."""
        cfg = self.cfg
        logits = jnp.dot(
            x.astype(jnp.float32),
            self.router[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)
        if cfg.router_renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        real = (segment_ids.reshape(-1) != 0).astype(jnp.float32)
        # Counted by scatter-add: a one-hot [tokens, k, experts] would be large at 128 experts.
        rank = jnp.broadcast_to(jnp.arange(cfg.experts_per_token), experts.shape)
        chosen = jnp.zeros((cfg.experts_per_token, cfg.num_experts), jnp.float32)
        chosen = chosen.at[rank, experts].add(jnp.broadcast_to(real[:, None], experts.shape))
        stats = RouterStats(
            tokens=jnp.sum(real),
            chosen=chosen,
            probability=jnp.einsum("n,ne->e", real, probs),
            z=jnp.sum(real * jax.nn.logsumexp(logits, axis=-1) ** 2),
        )
        return weights, experts, stats

    def __call__(self, x, segment_ids, dropout_rng=None):
        """``(output [b, t, d], RouterStats)``."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        weights, experts, stats = self.route(tokens, segment_ids)
        implementation = cfg.moe_matmul
        if implementation == "dense":
            out = self._dense(tokens.astype(dt), weights, experts, _activation(cfg))
            return out.reshape(b, t, d), stats
        names = [n for n in EXPERT_PARAMS if hasattr(self, n)]
        params = {n: getattr(self, n)[...] for n in names}
        layout = expert_layout(cfg, self.rules, b, t, {n: getattr(self, n) for n in names})
        compute = functools.partial(
            expert_outputs, cfg, implementation, dropout_rng=dropout_rng, layout=layout
        )
        shaped = (x.astype(dt), weights.reshape(b, t, -1), experts.reshape(b, t, -1))
        if layout is None:
            out = compute(*shaped, params)
        else:
            out = jax.shard_map(
                compute,
                in_specs=(*layout.token_specs, layout.param_specs),
                out_specs=layout.token_specs[0],
            )(*shaped, params)
        return out.astype(dt), stats

    def _dense(self, tokens, weights, experts, act):
        """Every expert on every token, weighted by the router (zero for experts not chosen):
        the reference that the grouped products are checked and measured against."""
        cfg = self.cfg
        dt = tokens.dtype
        dense_weights = jnp.einsum(
            "nk,nke->ne",
            weights,
            jax.nn.one_hot(experts, cfg.num_experts, dtype=jnp.float32),
        )
        out = jnp.zeros(tokens.shape, jnp.float32)
        for e in range(cfg.num_experts):
            gate = jnp.dot(tokens, self.gate[...][e].astype(dt), preferred_element_type=jnp.float32)
            up = jnp.dot(tokens, self.up[...][e].astype(dt), preferred_element_type=jnp.float32)
            hidden = (act(gate.astype(dt)) * up.astype(dt)).astype(dt)
            y = jnp.dot(hidden, self.down[...][e].astype(dt), preferred_element_type=jnp.float32)
            out = out + dense_weights[:, e : e + 1] * y
        return out.astype(dt)
