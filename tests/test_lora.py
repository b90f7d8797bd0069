"""LoRA: only the adapters train and hold optimizer state; a fresh LoRA model is its base; the
merged model (itune's and transformers' from the merged export) is the LoRA model; adapters
save and load alone (in PEFT's layout); sharded steps equal the 1-device step."""

import dataclasses
import doctest
import functools
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from itune import sharding
from itune.convert import hf, peft, weights
from itune.model import lora
from itune.model.decoder import Decoder
from itune.training import state as state_lib, step
from tests.util import packed_batch, tiny_model_config

transformers.utils.logging.disable_progress_bar()

# Every target, so that each layout of merge and of the PEFT export is exercised.
BASE = tiny_model_config(num_kv_heads=2, tie_embeddings=False, norm_eps=1e-5)
CFG = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, lora_targets="q,k,v,o,gate,up,down")
LR = 1e-2


def model_params(cfg, seed=0):
    return nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))


def flat(params) -> dict[str, np.ndarray]:
    return dict(weights.host_params(params))


def randomize_adapters(params, seed=1, std=0.2):
    """``params`` with every adapter (B included) random, so that all of them matter."""
    rng = np.random.default_rng(seed)

    def fill(path, variable):
        if not isinstance(variable, lora.LoRAParam):
            return variable
        value = rng.normal(0.0, std, variable.shape).astype(variable.dtype)
        old = variable.get_value()
        return variable.replace(jax.device_put(value, getattr(old, "sharding", None)))

    return jax.tree_util.tree_map_with_path(
        fill, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def forward(graphdef, params, batch):
    @jax.jit
    def run(params, inputs, positions, segment_ids):
        return nnx.merge(graphdef, params)(inputs, positions, segment_ids)

    return np.asarray(run(params, batch["inputs"], batch["positions"], batch["segment_ids"]))


def batch_of(seed=0, rows=4, length=16, vocab=BASE.vocab_size):
    return {k: jnp.asarray(v) for k, v in packed_batch(seed, rows, length, vocab).items()}


def test_config_and_docstrings():
    assert doctest.testmod(lora).failed == 0
    assert lora.parse_targets(" q, gate ") == ("q", "gate")
    for bad in (dict(lora_targets="q,x"), dict(lora_targets="q,q"), dict(lora_rank=-1)):
        with pytest.raises(ValueError):
            dataclasses.replace(CFG, **bad)
    with pytest.raises(ValueError, match="lora_dropout"):
        dataclasses.replace(CFG, lora_dropout=1.0)
    _, params = model_params(CFG)
    adapters = lora.adapters_only(params)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(adapters)) == lora.num_params(CFG)
    assert lora.num_params(BASE) == 0


# ----------------------------------------------------------------------------------------------
# (a) Only the adapters train


@pytest.fixture(scope="module")
def stepped():
    """One 1-device `step.train_step` of AdamW wrapped by `lora.optimizer`, from a LoRA model
    whose adapters are all random (B too, so that A gets a gradient)."""
    graphdef, params = model_params(CFG)
    params = randomize_adapters(params)
    batch = packed_batch(0, batch=8, length=16, vocab=CFG.vocab_size)
    tx = lora.optimizer(optax.adamw(LR, weight_decay=0.1), params)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    fn = functools.partial(
        step.train_step, graphdef=graphdef, tx=tx, schedule=optax.constant_schedule(LR)
    )
    before = flat(params)
    new_state, metrics = jax.jit(fn)(state, batch)
    return dict(
        graphdef=graphdef,
        params=params,
        before=before,
        batch=batch,
        state=new_state,
        metrics=jax.device_get(metrics),
    )


def test_only_adapters_change_and_hold_optimizer_state(stepped):
    graphdef, params, before = stepped["graphdef"], stepped["params"], stepped["before"]
    state, metrics = stepped["state"], stepped["metrics"]
    batch = {k: jnp.asarray(v) for k, v in stepped["batch"].items()}
    after = flat(state.params)
    adapters = [n for n in before if lora.is_lora(n)]
    assert len(adapters) == 14 and len(before) == 14 + 12  # 7 targets x (A, B); 12 base.
    for name in before:
        if lora.is_lora(name):
            # Every element of every adapter moved.
            assert np.all(after[name] != before[name]), name
        else:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert np.isfinite(float(metrics["loss"]))

    # The base gets exactly zero gradient (it is behind stop_gradient), the adapters do not.
    grads = jax.grad(lambda p: step.loss_fn(p, graphdef, batch)[0])(params)
    for name, grad in flat(grads).items():
        assert np.any(grad != 0) == lora.is_lora(name), name

    # Optimizer state: AdamW's two moments for the adapters only, nothing for the base.
    counts = lora.check_opt_state(state.opt_state, params)
    adapter_elements = sum(before[n].size for n in adapters)
    all_elements = sum(v.size for v in before.values())
    state_arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert counts == {"adapter_elements": adapter_elements, "state_elements": 2 * adapter_elements}
    assert len(state_arrays) == 2 * len(adapters)
    assert sum(x.nbytes for x in state_arrays) == 2 * 4 * adapter_elements
    full = jax.eval_shape(optax.adamw(LR).init, params)
    full_bytes = sum(x.size * 4 for x in jax.tree.leaves(full) if x.ndim > 0)
    print(
        f"\noptimizer state: {2 * 4 * adapter_elements} bytes for {adapter_elements} adapter "
        f"elements (full AdamW: {full_bytes} bytes; model {all_elements} elements)"
    )
    with pytest.raises(AssertionError, match="non-adapter"):
        lora.check_opt_state(full, params)


def test_dropout():
    cfg = dataclasses.replace(CFG, lora_dropout=0.5)
    graphdef, params = model_params(cfg)
    params = randomize_adapters(params)
    batch = batch_of()

    @jax.jit
    def run(params, key):
        model = nnx.merge(graphdef, params)
        return model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_rng=key)

    plain = forward(graphdef, params, batch)  # No key: deterministic.
    no_dropout = forward(*model_params(CFG)[:1], params, batch)
    np.testing.assert_array_equal(plain, no_dropout)
    one, again, other = (np.asarray(run(params, jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(one, again)
    assert np.abs(one - plain).max() > 1e-3 and np.abs(one - other).max() > 1e-3
    # Dropout 0 ignores the key.
    np.testing.assert_array_equal(
        np.asarray(
            jax.jit(
                lambda p, k: nnx.merge(model_params(CFG)[0], p)(
                    batch["inputs"], batch["positions"], batch["segment_ids"], dropout_rng=k
                )
            )(params, jax.random.key(0))
        ),
        plain,
    )


# ----------------------------------------------------------------------------------------------
# (b), (c) Fresh LoRA = base; merged = base + adapters, in itune and in transformers


@pytest.mark.parametrize("scan_layers", [True, False])
def test_fresh_lora_model_is_its_base(scan_layers):
    base_graphdef, base = model_params(dataclasses.replace(BASE, scan_layers=scan_layers))
    graphdef, params = model_params(dataclasses.replace(CFG, scan_layers=scan_layers))
    adapters, frozen = lora.split_trainable(params)
    base_flat = flat(base)
    assert flat(frozen).keys() == base_flat.keys()
    for name, value in flat(frozen).items():  # The same seed draws the same base.
        np.testing.assert_array_equal(value, base_flat[name], err_msg=name)
    assert all(not np.any(v) for n, v in flat(adapters).items() if n.endswith("_lora_b"))
    batch = batch_of()
    np.testing.assert_array_equal(
        forward(graphdef, params, batch), forward(base_graphdef, base, batch)
    )


def test_fresh_adapters_for_a_loaded_base():
    """What a run from a pretrained base does: base (a plain model) + `init_adapters`, in shards;
    the result is the LoRA model of the same seed."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    adapters = lora.init_adapters(CFG, mesh, sharding.DEFAULT_RULES, seed=0)
    _, params = model_params(CFG)
    _, base = model_params(BASE)
    expected = flat(params)
    combined = flat(lora.with_adapters(base, adapters))
    assert combined.keys() == expected.keys()
    for name, value in combined.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    q_a = adapters["blocks"]["attn"]["q_lora_a"].get_value()
    assert tuple(q_a.sharding.spec) == (None, "fsdp", None)
    small = lora.init_adapters(dataclasses.replace(CFG, mlp_dim=32))
    with pytest.raises(ValueError, match="does not fit"):
        lora.with_adapters(base, small)


class WarningLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_transformers(path):
    """transformers' model of ``path``, failing on any missing or unexpected weight or warning."""
    log = WarningLog()
    logger = logging.getLogger("transformers")
    logger.addHandler(log)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, attn_implementation="eager"
        )
    finally:
        logger.removeHandler(log)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info[key]}"
    assert not log.messages, log.messages
    return model.eval()


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def one_segment(tokens):
    rows, length = tokens.shape
    return {
        "inputs": jnp.asarray(tokens),
        "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length)),
        "segment_ids": jnp.ones((rows, length), jnp.int32),
    }


@pytest.fixture(scope="module")
def trained():
    """A LoRA model with random adapters, and its logits on one-segment rows."""
    graphdef, params = model_params(CFG)
    params = randomize_adapters(params)
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 24), dtype=np.int32)
    return dict(
        graphdef=graphdef,
        params=params,
        tokens=tokens,
        logits=forward(graphdef, params, one_segment(tokens)),
    )


def test_merge_and_merged_export(trained, tmp_path):
    params, tokens, expected = trained["params"], trained["tokens"], trained["logits"]
    plain_cfg, merged = lora.merge(CFG, params)
    assert plain_cfg == BASE
    plain_graphdef, abstract = weights.abstract_params(plain_cfg)
    assert flat(merged).keys() == {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(abstract)}
    logits = forward(plain_graphdef, merged, one_segment(tokens))
    base_logits = forward(plain_graphdef, lora.split_trainable(params)[1], one_segment(tokens))
    merge_error = relative_error(logits, expected)
    print(
        f"\nmerged vs LoRA logits: max relative error {merge_error:.2e}, max |diff| "
        f"{np.abs(logits - expected).max():.2e} (logits up to {np.abs(expected).max():.1f}; "
        f"the adapters move them by {np.abs(base_logits - expected).max():.2f})"
    )
    assert merge_error < 1e-5
    assert np.abs(base_logits - expected).max() > 0.1  # The adapters matter.

    hf.save_hf(str(tmp_path), CFG, params)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    model = load_transformers(str(tmp_path))
    error = relative_error(torch_logits(model, tokens), expected)
    print(f"merged export in transformers vs LoRA logits: max relative error {error:.2e}")
    assert error < 1e-4


# ----------------------------------------------------------------------------------------------
# (d) Adapters alone


def test_adapters_save_and_load(trained, tmp_path):
    params, tokens, expected = trained["params"], trained["tokens"], trained["logits"]
    adapters, base = lora.split_trainable(params)
    peft.save_adapters(str(tmp_path / "adapter"), CFG, params, base_model="tiny")
    with open(tmp_path / "adapter" / peft.ADAPTER_CONFIG) as f:
        written = json.load(f)
    assert written["r"] == 4 and written["lora_alpha"] == 8.0 and written["peft_type"] == "LORA"
    assert written["target_modules"] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]  # fmt: skip

    # Loaded onto the base alone (a plain config): the same config, adapters and logits.
    cfg, loaded = peft.load_adapters(str(tmp_path / "adapter"), BASE)
    assert cfg == CFG
    original = flat(adapters)
    assert flat(loaded).keys() == original.keys()
    for name, value in flat(loaded).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    restored = lora.with_adapters(base, loaded)
    graphdef, _ = weights.abstract_params(cfg)
    np.testing.assert_array_equal(forward(graphdef, restored, one_segment(tokens)), expected)
    # Put onto a LoRA model with other adapters, they replace them.
    _, fresh = model_params(CFG, seed=0)
    np.testing.assert_array_equal(
        forward(graphdef, lora.with_adapters(fresh, loaded), one_segment(tokens)), expected
    )

    # PEFT's layout: W + alpha / r * B @ A on transformers' base gives the LoRA model.
    hf.save_hf(str(tmp_path / "base"), BASE, base)
    model = load_transformers(str(tmp_path / "base"))
    import safetensors.torch  # noqa: PLC0415

    tensors = safetensors.torch.load_file(str(tmp_path / "adapter" / peft.ADAPTER_FILE))
    assert len(tensors) == 2 * 7 * CFG.num_layers
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            module = modules[name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")]
            module.weight += (written["lora_alpha"] / written["r"]) * (b @ a)
    error = relative_error(torch_logits(model, tokens), expected)
    print(f"\nPEFT-layout adapters applied in torch vs LoRA logits: max relative error {error:.2e}")
    assert error < 1e-4

    # Errors: a missing tensor, an option itune lacks.
    with pytest.raises(ValueError, match="not supported"):
        (tmp_path / "bad").mkdir()
        with open(tmp_path / "bad" / peft.ADAPTER_CONFIG, "w") as f:
            json.dump({**written, "use_dora": True}, f)
        peft.load_adapters(str(tmp_path / "bad"), BASE)
    with pytest.raises(ValueError, match="not an adapter"):
        lora.with_adapters(base, base)


# ----------------------------------------------------------------------------------------------
# (e) Sharded


def lora_layout(cfg, tx, mesh, rules):
    """`state_lib.state_layout` for a LoRA optimizer: its moment trees hold ``optax.MaskedNode``
    (nothing) for the base, kept as they are; the adapters' moments take their shardings."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rules, rngs=nnx.Rngs(0))))
    param_shardings = sharding.state_shardings(abstract, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        tx,
        lambda leaf, s: leaf if isinstance(leaf, optax.MaskedNode) else s,
        jax.eval_shape(tx.init, abstract),
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (nnx.Variable, optax.MaskedNode)),
    )
    return graphdef, state_lib.TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings
    )


def sharded_step(mesh_shape, batch, rules=sharding.DEFAULT_RULES):
    """One step as the trainer runs it: the state made in its shards, a jitted, donating step
    with explicit shardings; adapters randomised as in `stepped` (kept in their shards)."""
    devices = jax.devices()[: math.prod(mesh_shape)]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(CFG, rules, rngs=nnx.Rngs(0))))
    tx = lora.optimizer(optax.adamw(LR, weight_decay=0.1), abstract)
    graphdef, shardings = lora_layout(CFG, tx, mesh, rules)

    def init():
        params = nnx.state(Decoder(CFG, rules, rngs=nnx.Rngs(0)))
        return state_lib.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
        )

    batch_sharding = sharding.batch_sharding(mesh, rules)
    train_step = jax.jit(
        functools.partial(
            step.train_step, graphdef=graphdef, tx=tx, schedule=optax.constant_schedule(LR)
        ),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
        state = state.replace(params=randomize_adapters(state.params))
        batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        state, metrics = train_step(state, batch)
    return state, jax.device_get(metrics)


def test_sharded_step_matches_one_device(stepped):
    ref_state, ref_metrics = stepped["state"], stepped["metrics"]
    state, metrics = sharded_step((1, 2, 4), stepped["batch"])
    specs = {
        name: tuple(v.get_value().sharding.spec)
        for name, v in (("/".join(map(str, p)), v) for p, v in nnx.to_flat_state(state.params))
    }
    # The adapters shard by their base weight's rules ('lora_rank' replicated).
    assert specs["blocks/attn/q_lora_a"] == (None, "fsdp", None)
    assert specs["blocks/attn/q_lora_b"] == (None, None, "tensor", None)
    assert specs["blocks/attn/o_lora_a"] == (None, "tensor", None, None)
    assert specs["blocks/mlp/down_lora_a"] == (None, "tensor", None)
    assert specs["blocks/mlp/up_lora_b"] == (None, None, "tensor")
    q_b = state.params["blocks"]["attn"]["q_lora_b"].get_value()
    assert len(q_b.sharding.device_set) == 8
    # Optimizer moments of the adapters follow the adapters' shardings; none for the base.
    lora.check_opt_state(state.opt_state, state.params)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0 and x.shape == q_b.shape]
    assert moments and all(m.sharding.spec == q_b.sharding.spec for m in moments)

    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    got, want = flat(state.params), flat(ref_state.params)
    worst = 0.0
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        worst = max(worst, float(np.abs(got[name] - value).max()))
    print(f"\nmesh (1, 2, 4) vs one device after one step: max |param diff| {worst:.2e}")


def test_itune_train_with_lora_and_dropout_trains_only_adapters_and_exports_merged(tmp_path):
    import torch
    import transformers

    from configs import smoke
    from itune.convert import hf as hf_convert, model_dir
    from itune.training.trainer import train_and_evaluate

    config = smoke.get_config("runlocal")
    with config.unlocked():
        config.train.num_steps = 2
        config.model.lora_rank = 4
        config.model.lora_dropout = 0.1
        config.model.lora_targets = "q,v,gate"
    results = train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(results["eval_loss"])
    loaded = model_dir.load_model(str(tmp_path / "run"))
    assert loaded.config.lora_rank == 4
    adapters, _ = lora.split_trainable(loaded.params)
    assert all(float(np.abs(np.asarray(b)).max()) > 0 for b in jax.tree.leaves(adapters))
    hf_convert.save_hf(str(tmp_path / "hf"), loaded.config, loaded.params, loaded.tokenizer)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32
    )
    tokens = np.asarray([loaded.tokenizer.encode("Add 3 and 4.")], np.int32)
    ours = np.asarray(loaded.model(tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens)))
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
