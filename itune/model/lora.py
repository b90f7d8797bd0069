"""LoRA: low-rank adapters on the decoder's projections, with the base weights frozen.

With ``model.lora_rank`` r > 0, each projection named in ``model.lora_targets`` (of `TARGETS`)
gains two `LoRAParam` arrays, stacked over layers like its base weight and named after it
(``blocks/attn/q_lora_a``, ``blocks/attn/q_lora_b``)::

    A  [in..., r]   kaiming-uniform (as PEFT)    q: ('embed', 'lora_rank')
    B  [r, out...]  zeros                        q: ('lora_rank', 'heads', 'head_dim')

and computes ``base(x) + (lora_alpha / r) * (dropout(x) @ A) @ B``. In a mixture of experts
(``num_experts``), gate, up and down name the experts' projections, and each expert has its own
pair (``blocks/moe/gate_lora_a [layers, experts, d_model, r]``), run as grouped products as the
experts' weights are (`itune.model.moe`). B starts at zero, so a fresh
LoRA model computes exactly what its base does. A and B carry the logical axis names of the base
weight's input and output dimensions, so they shard by the same rules; ``'lora_rank'`` is in no
rules table, so that dimension is replicated. Every base parameter enters the forward pass
through `jax.lax.stop_gradient` (`freeze_base`), so no gradient is computed for it, and
`optimizer` keeps optimizer state for the adapters only.

Dropout on the adapters' input draws from a ``dropout_rng`` passed to the model call
(``model(tokens, positions, segment_ids, dropout_rng=key)``), split per layer and folded per
projection; without one (evaluation, generation) the adapters run deterministically.

Adapter parameters are told apart by their type (``nnx.state(model, LoRAParam)``) or by their
path (`is_lora`). `merge` folds them into the base weights for export as a plain model;
`adapters_only` and `with_adapters` save and restore the adapters alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

if TYPE_CHECKING:
    from itune.model.config import ModelConfig

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
SUFFIXES = ("_lora_a", "_lora_b")


class LoRAParam(nnx.Param):
    """A LoRA adapter array: the only parameters trained when LoRA is on."""


# ----------------------------------------------------------------------------------------------
# Config


def parse_targets(targets: str) -> tuple[str, ...]:
    """``"q, v,gate"`` -> ``('q', 'v', 'gate')``; a ValueError names an unknown or repeated one.

    >>> parse_targets("q,k,v,o")
    ('q', 'k', 'v', 'o')
    """
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [t for t in names if t not in TARGETS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"model.lora_targets={targets!r}: expected distinct names among {list(TARGETS)}"
        )
    return names


def check_config(cfg: ModelConfig) -> None:
    """ValueError for LoRA fields out of range (called by `ModelConfig.__post_init__`)."""
    if cfg.lora_rank < 0:
        raise ValueError(f"model.lora_rank={cfg.lora_rank}; expected 0 (no LoRA) or more")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"model.lora_dropout={cfg.lora_dropout}; expected 0 <= p < 1")
    targets = parse_targets(cfg.lora_targets)
    if cfg.lora_rank and not targets:
        raise ValueError("model.lora_targets is empty but model.lora_rank > 0")


def scale(cfg: ModelConfig) -> float:
    """``lora_alpha / lora_rank``: the factor of the adapters' product."""
    return cfg.lora_alpha / cfg.lora_rank


def shapes(
    cfg: ModelConfig,
) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple, tuple]]:
    """``{target: (in_shape, in_axes, out_shape, out_axes)}`` of each projection's base weight
    (per layer; the base weight is ``in_shape + out_shape``)."""
    d, h, kv, k, m = (
        cfg.d_model,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
    )
    return {
        "q": ((d,), ("embed",), (h, k), ("heads", "head_dim")),
        "k": ((d,), ("embed",), (kv, k), ("kv_heads", "head_dim")),
        "v": ((d,), ("embed",), (kv, k), ("kv_heads", "head_dim")),
        "o": ((h, k), ("heads", "head_dim"), (d,), ("embed",)),
        "gate": ((d,), ("embed",), (m,), ("mlp",)),
        "up": ((d,), ("embed",), (m,), ("mlp",)),
        "down": ((m,), ("mlp",), (d,), ("embed",)),
    }


def experts_of(cfg: ModelConfig, target: str) -> int:
    """How many experts each hold their own adapters of ``target`` (0: one shared pair)."""
    return cfg.num_experts if target in MLP_TARGETS else 0


def base_path(target: str, cfg: ModelConfig | None = None) -> str:
    """The stacked base weight an adapter of ``target`` belongs to (``'blocks/attn/q'``)."""
    if target in ATTENTION_TARGETS:
        return "blocks/attn/" + target
    return ("blocks/moe/" if cfg is not None and cfg.num_experts else "blocks/mlp/") + target


def without_lora(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every LoRA field at its default (no adapters): the base model's config."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name.startswith("lora_")}
    return dataclasses.replace(cfg, **defaults)


def num_params(cfg: ModelConfig) -> int:
    """Adapter parameters of ``cfg`` (0 without LoRA)."""
    if not cfg.lora_rank:
        return 0
    total = 0
    for target in parse_targets(cfg.lora_targets):
        in_shape, _, out_shape, _ = shapes(cfg)[target]
        pair = cfg.lora_rank * (math.prod(in_shape) + math.prod(out_shape))
        total += pair * max(1, experts_of(cfg, target))
    return cfg.num_layers * total


# ----------------------------------------------------------------------------------------------
# Model hooks (called by itune.model.decoder)


def _kaiming_uniform(key, shape, dtype, experts: int = 0):
    """PEFT's A init (``kaiming_uniform_(a=sqrt(5))``): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(math.prod(shape[1 if experts else 0 : -1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def add_adapters(module: nnx.Module, cfg: ModelConfig, group: Sequence[str], rngs: nnx.Rngs):
    """Adds ``{t}_lora_a`` and ``{t}_lora_b`` to ``module`` for each LoRA target ``t`` in
    ``group``. Called after all base parameters of a block are made, so that turning LoRA on
    does not change the base parameters drawn from the same seed."""
    if not cfg.lora_rank:
        return
    r, dtype = cfg.lora_rank, jnp.dtype(cfg.param_dtype)
    table = shapes(cfg)
    for target in parse_targets(cfg.lora_targets):
        if target not in group:
            continue
        in_shape, in_axes, out_shape, out_axes = table[target]
        experts = experts_of(cfg, target)
        lead, lead_axes = ((experts,), ("expert",)) if experts else ((), ())
        in_shape, in_axes = (*lead, *in_shape), (*lead_axes, *in_axes)
        a = _kaiming_uniform(rngs.params(), (*in_shape, r), dtype, experts)
        b = jnp.zeros((*lead, r, *out_shape), dtype)
        out_axes = (*lead_axes, *out_axes)
        # eager_sharding=False: the names are logical (see decoder._param).
        setattr(
            module,
            f"{target}_lora_a",
            LoRAParam(a, out_sharding=(*in_axes, "lora_rank"), eager_sharding=False),
        )
        setattr(
            module,
            f"{target}_lora_b",
            LoRAParam(
                b,
                out_sharding=(*lead_axes, "lora_rank", *out_axes[len(lead) :]),
                eager_sharding=False,
            ),
        )


def _dropout(cfg: ModelConfig, target: str, x: jax.Array, dropout_rng) -> jax.Array:
    """The adapters' input ``x`` with LoRA dropout when ``dropout_rng`` is given."""
    rate, dt = cfg.lora_dropout, x.dtype
    if dropout_rng is None or rate <= 0.0:
        return x
    key = jax.random.fold_in(dropout_rng, TARGETS.index(target))
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, dt), jnp.zeros((), dt))


def apply_grouped(cfg, target, a, b, x, y, group_sizes, grouped_matmul, dropout_rng=None):
    """`apply` for the experts' projections: rows ``x [rows, in]`` grouped by expert
    (``group_sizes``), each group through its expert's own pair ``a [experts, in, r]``, ``b
    [experts, r, out]`` (None: no adapters) by ``grouped_matmul(x, w, group_sizes)``."""
    if a is None:
        return y
    dt = jnp.dtype(cfg.dtype)
    a, b = a.astype(dt), b.astype(dt)
    x = _dropout(cfg, target, x.astype(dt), dropout_rng)
    low = (grouped_matmul(x, a, group_sizes) * scale(cfg)).astype(dt)
    return y + grouped_matmul(low, b, group_sizes).astype(y.dtype)


def apply(module: nnx.Module, target: str, x: jax.Array, y: jax.Array, dropout_rng=None):
    """``y + scale * (dropout(x) @ A) @ B`` when ``module`` has adapters for ``target``, else
    ``y``. ``x`` is ``[batch, length, in...]``, ``y`` ``[batch, length, out...]``; A and B are
    one layer's (inside the layer scan)."""
    a = getattr(module, f"{target}_lora_a", None)
    if a is None:
        return y
    cfg = module.cfg
    dt = jnp.dtype(cfg.dtype)
    a, b = a[...].astype(dt), getattr(module, f"{target}_lora_b")[...].astype(dt)
    x = _dropout(cfg, target, x.astype(dt), dropout_rng)  # A norm's output is float32.
    low = jnp.tensordot(x, a, axes=a.ndim - 1) * jnp.asarray(scale(cfg), dt)
    return y + jnp.tensordot(low, b, axes=1).astype(y.dtype)


def freeze_base(model: nnx.Module) -> nnx.Module:
    """A view of ``model`` whose every parameter except the adapters passes through
    `jax.lax.stop_gradient` (the same values; no gradient is computed for them)."""
    graphdef, state = nnx.split(model)

    def freeze(variable):
        if isinstance(variable, LoRAParam):
            return variable
        return variable.replace(jax.lax.stop_gradient(variable.get_value()))

    return nnx.merge(graphdef, jax.tree.map(freeze, state, is_leaf=_is_variable))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


# ----------------------------------------------------------------------------------------------
# Parameters


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def is_lora(path: str | Sequence[Any]) -> bool:
    """Whether a parameter path (``'blocks/attn/q_lora_a'``, a tuple of names, or a jax key
    path) is an adapter's.

    >>> is_lora("blocks/attn/q_lora_a"), is_lora(("blocks", "attn", "q"))
    (True, False)
    """
    names = path.split("/") if isinstance(path, str) else [_key_name(k) for k in path]
    names = [n for n in names if n != "value"]  # A jax key path ends in the Variable's value.
    return bool(names) and names[-1].endswith(SUFFIXES)


def lora_filter(path, variable) -> bool:
    """An NNX filter for adapters: ``nnx.state(model, lora_filter)``, as `LoRAParam` is."""
    return isinstance(variable, LoRAParam) or is_lora(path)


def split_trainable(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """``(adapters, frozen)``: the adapter parameters and all the others (the base)."""
    return nnx.split_state(params, lora_filter, ...)


def adapters_only(params: nnx.State) -> nnx.State:
    """The adapter parameters alone (to save them without the base)."""
    return split_trainable(params)[0]


def with_adapters(params: nnx.State, adapters: nnx.State) -> nnx.State:
    """The parameters of a LoRA model: the base of ``params`` (any adapters it holds are
    dropped) with ``adapters`` put in. A ValueError names an adapter that does not fit its base
    weight (`shapes`: A is ``[layers, in..., r]``, B ``[layers, r, out...]``)."""
    flat = dict(nnx.to_flat_state(split_trainable(params)[1]))
    for path, variable in nnx.to_flat_state(adapters):
        name = "/".join(map(str, path))
        if not is_lora(path):
            raise ValueError(f"with_adapters: {name} is not an adapter parameter")
        target, which = str(path[-1]).rsplit("_lora_", 1)
        base = flat.get((*path[:-1], target))
        if base is None:
            raise ValueError(f"with_adapters: no base weight for the adapter {name}")
        shape, base_shape = tuple(variable.shape), tuple(base.shape)
        lead = 2 if "moe" in map(str, path) else 1  # Layers (and experts) lead B.
        fits = (
            shape[:-1] == base_shape[: len(shape) - 1]
            if which == "a"
            else shape[:lead] == base_shape[:lead]
            and base_shape[len(base_shape) - len(shape) + lead + 1 :] == shape[lead + 1 :]
        )
        if not fits:
            raise ValueError(f"with_adapters: {name} {shape} does not fit {target} {base_shape}")
        flat[path] = (
            variable
            if isinstance(variable, LoRAParam)
            else LoRAParam(variable.get_value(), **variable.get_metadata())
        )
    return nnx.from_flat_state(sorted(flat.items()))


def init_adapters(cfg: ModelConfig, mesh=None, rules=(), seed: int = 0) -> nnx.State:
    """Fresh adapters of ``cfg`` (the very ones ``Decoder(cfg, rngs=nnx.Rngs(seed))`` holds),
    made in their shards on ``mesh`` when given; the base is never materialised."""
    from itune import sharding  # noqa: PLC0415
    from itune.model.decoder import Decoder  # noqa: PLC0415  (decoder imports this module)

    if not cfg.lora_rank:
        raise ValueError("init_adapters: model.lora_rank is 0")

    def make():
        return adapters_only(nnx.state(Decoder(cfg, rules, rngs=nnx.Rngs(seed))))

    if mesh is None:
        return jax.jit(make)()
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rules, rngs=nnx.Rngs(seed)))
    shardings = sharding.state_shardings(adapters_only(nnx.state(abstract)), mesh, rules)
    with jax.set_mesh(mesh):
        return jax.jit(make, out_shardings=shardings)()


def _fold(w, a, b, factor, lead=1):
    """``w + factor * a @ b`` for stacked ``w [L, in..., out...]``, ``a [L, in..., r]``,
    ``b [L, r, out...]``, in float32; ``lead`` 2: each of the ``w [L, E, ...]`` experts with its
    own pair."""
    stacks, r = math.prod(a.shape[:lead]), a.shape[-1]
    delta = jnp.einsum(
        "lir,lro->lio",
        a.reshape(stacks, -1, r).astype(jnp.float32),
        b.reshape(stacks, r, -1).astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return (w.astype(jnp.float32) + factor * delta.reshape(w.shape)).astype(w.dtype)


def merge(cfg: ModelConfig, params: nnx.State) -> tuple[ModelConfig, nnx.State]:
    """``(cfg without LoRA, params)`` of the plain model that computes what the LoRA model does:
    each base weight plus ``(lora_alpha / r) * A @ B`` (in float32, then the base's dtype, kept
    in the base's sharding). ``weights.abstract_params(new_cfg)`` gives the matching graph."""
    plain = without_lora(cfg)
    if not cfg.lora_rank:
        return plain, params
    flat = dict(nnx.to_flat_state(params))
    factor = scale(cfg)
    for target in parse_targets(cfg.lora_targets):
        path = tuple(base_path(target, cfg).split("/"))
        a = flat.pop((*path[:-1], f"{target}_lora_a"))
        b = flat.pop((*path[:-1], f"{target}_lora_b"))
        w = flat[path]
        value = w.get_value()
        sharding = getattr(value, "sharding", None)
        fold = jax.jit(_fold, static_argnums=(3, 4), out_shardings=sharding)
        lead = 2 if experts_of(cfg, target) else 1
        flat[path] = w.replace(fold(value, a.get_value(), b.get_value(), factor, lead))
    leftover = [p for p in flat if is_lora(p)]
    if leftover:
        raise ValueError(f"merge: adapters {leftover} are not among model.lora_targets")
    return plain, nnx.from_flat_state(sorted(flat.items()))


# ----------------------------------------------------------------------------------------------
# Optimizer


def labels(params: Any) -> Any:
    """``'lora'`` for each adapter of ``params``, ``'frozen'`` for every other parameter."""

    def label(path, leaf):
        return "lora" if isinstance(leaf, LoRAParam) or is_lora(path) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_variable)


def optimizer(
    tx: optax.GradientTransformation, params_abstract: Any = None
) -> optax.GradientTransformation:
    """``tx`` on the adapters only; the base gets zero updates and no optimizer state at all
    (`optax.set_to_zero`). With ``params_abstract`` (`nnx.State` of shapes, e.g. from
    `nnx.eval_shape`), checks that the optimizer state holds only scalars and arrays of
    adapters (`check_opt_state`)."""
    lora_tx = optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)
    if params_abstract is not None:
        check_opt_state(jax.eval_shape(lora_tx.init, params_abstract), params_abstract)
    return lora_tx


def check_opt_state(opt_state: Any, params: Any) -> dict[str, int]:
    """AssertionError unless every non-scalar leaf of ``opt_state`` sits at an adapter's path;
    returns ``{'adapter_elements': n, 'state_elements': m}`` (m is a small multiple of n:
    AdamW's two moments make it 2n)."""
    leaves = jax.tree_util.tree_leaves_with_path(opt_state)
    stray = [
        jax.tree_util.keystr(path)
        for path, leaf in leaves
        if getattr(leaf, "ndim", 0) > 0 and not is_lora(path)
    ]
    if stray:
        raise AssertionError(f"optimizer state for non-adapter parameters: {stray[:8]}")
    adapters = adapters_only(params) if isinstance(params, nnx.State) else params
    return {
        "adapter_elements": sum(math.prod(x.shape) for x in jax.tree.leaves(adapters)),
        "state_elements": sum(
            math.prod(leaf.shape) for _, leaf in leaves if getattr(leaf, "ndim", 0) > 0
        ),
    }
