"""Qwen3, Gemma 2, Gemma 3 (text), Mixtral and Qwen3-MoE against transformers itself.

Each family is a tiny random float32 transformers model (eager attention) with every feature
switched on so that it binds: windows shorter than the sequence, soft-caps below the scores,
``query_pre_attn_scalar`` apart from head_dim, q/k norms, a global/local layer pattern with a
remainder and two RoPE bases, several experts chosen top-k > 1 with uneven routing, and random
norm weights (transformers makes them constant), so that a swapped norm shows. Per family:
logits on unpacked and packed rows, greedy decoding through itune's KV cache against
``generate``, import -> ``save_hf`` -> ``from_pretrained``, and a train step on a mesh against
one device. ``pytest -s`` prints the parity table at the end.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from itune import sharding
from itune.convert import hf, weights
from itune.evaluation import sampler
from itune.model import lora, presets
from itune.model.decoder import Decoder, ModelConfig
from tests.util import (
    flat,
    from_pretrained_cleanly,
    hf_logits,
    itune_logits,
    jitted_train_step,
    max_relative_error,
    optim_config,
    packed_batch,
)

transformers.utils.logging.disable_progress_bar()

TOLERANCE = 1e-4  # max |itune - transformers| / max |transformers|, float32.
MESH_TOLERANCE = 1e-5
VOCAB, SEQ = 256, 40
MESH = (2, 2, 2)  # data, fsdp, tensor.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.1,  # Large enough that attention is far from uniform.
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
FAMILIES = {
    # q/k norm, head_dim 16 apart from 32 / 4; a window on every other layer (Qwen3 reads
    # layer_types whenever use_sliding_window is on).
    "qwen3": (
        transformers.Qwen3Config,
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=dict(rope_type="default", rope_theta=1000.0),
        ),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            intermediate_size=64,
            num_hidden_layers=2,
            sliding_window=8,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=1.5,
        ),
    ),
    # Two sliding layers to one global (a group of 3 and a remainder of 1); local RoPE base 100,
    # global 10,000 scaled linearly by 4.
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            intermediate_size=64,
            num_hidden_layers=4,
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"]
            + ["sliding_attention"],
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=10_000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=100.0),
            },
        ),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        dict(
            intermediate_size=48,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            sliding_window=12,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.02,
        ),
    ),
    # Top-3 of 8 without renormalisation (norm_topk_prob off: the weights sum below 1).
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(
            intermediate_size=64,
            moe_intermediate_size=24,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            router_aux_loss_coef=0.01,
        ),
    ),
}
NORM_CENTER = {"gemma2": 0.0, "gemma3": 0.0}  # Gemma scales by 1 + w; the others by w.
# What each family's ModelConfig must say (beyond the shapes).
EXPECTED = {
    "qwen3": dict(qk_norm=True, sliding_window=8, global_layer_every=2, rope_theta=1000.0),
    "gemma2": dict(
        norm_plus_one=True,
        embed_scale=True,
        post_norms=True,
        qk_norm=False,
        query_pre_attn_scalar=24.0,
        attn_logit_softcap=0.5,
        final_logit_softcap=1.5,
        sliding_window=8,
        global_layer_every=2,
        mlp_activation="gelu_tanh",
    ),
    "gemma3": dict(
        post_norms=True,
        qk_norm=True,
        attn_logit_softcap=0.0,
        final_logit_softcap=0.0,
        global_layer_every=3,
        rope_theta=10_000.0,
        rope_local_theta=100.0,
        rope_scaling="linear",
        rope_scaling_factor=4.0,
    ),
    "mixtral": dict(
        num_experts=4,
        experts_per_token=2,
        router_renormalize=True,
        router_aux_loss_coef=0.02,
        sliding_window=12,
        mlp_dim=48,
        rope_theta=1_000_000.0,
    ),
    "qwen3_moe": dict(
        qk_norm=True, num_experts=8, experts_per_token=3, router_renormalize=False, mlp_dim=24
    ),
}
# Fields whose effect must show: with the value beside it itune no longer matches transformers.
MATTERS = {
    "qwen3": [("sliding_window", 0)],
    "gemma2": [
        ("attn_logit_softcap", 0.0),
        ("final_logit_softcap", 0.0),
        ("query_pre_attn_scalar", 0.0),
    ],
    "gemma3": [("rope_local_theta", 0.0), ("rope_scaling", "none"), ("global_layer_every", 0)],
    "mixtral": [("experts_per_token", 1)],
    "qwen3_moe": [("router_renormalize", True)],
}
RESULTS: dict[str, dict[str, str]] = {}


def record(family: str, column: str, value: str) -> None:
    RESULTS.setdefault(family, {})[column] = value


def build_hf_model(family: str, seed: int = 0):
    """A random transformers model with random norms (q/k norms included) and, for experts, a
    router sharp enough that the experts' loads are far from even."""
    config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(NORM_CENTER.get(family, 1.0) + 0.3 * torch.randn_like(param))
            elif name.endswith("gate.weight"):  # The router.
                param.mul_(8.0)
    return model.eval()


def token_rows(seed: int, lengths) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).astype(np.int32) for n in lengths]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``get(family)``: a saved transformers model and itune's import of it (cached)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = build_hf_model(family)
            path = str(tmp_path_factory.mktemp(family))
            model.save_pretrained(path)
            cfg, graphdef, params = hf.load_hf(path)
            cache[family] = dict(model=model, path=path, cfg=cfg, graphdef=graphdef, params=params)
        return cache[family]

    return get


# ----------------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_of_each_family(built, family):
    cfg = built(family)["cfg"]
    expected = EXPECTED[family]
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.tie_embeddings == FAMILIES[family][1].get("tie_word_embeddings", True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_unpacked_and_packed(built, family):
    """Unpacked rows; then two sequences packed into one row (positions restarting, segment
    ids) and a row with padding after its sequence: each segment's logits are those of
    transformers on that sequence alone."""
    run = built(family)
    tokens = np.stack(token_rows(1, [SEQ, SEQ]))
    reference = hf_logits(run["model"], tokens)
    unpacked = max_relative_error(itune_logits(run["graphdef"], run["params"], tokens), reference)

    segments = [[23, 17], [31]]  # Row 0: two sequences; row 1: one, then 9 of padding.
    sequences = token_rows(2, [n for row in segments for n in row])
    packed = np.zeros((2, SEQ), np.int32)
    positions = np.zeros((2, SEQ), np.int32)
    segment_ids = np.zeros((2, SEQ), np.int32)
    spans, i = [], 0
    for row, lengths in enumerate(segments):
        start = 0
        for seg, n in enumerate(lengths, start=1):
            packed[row, start : start + n] = sequences[i]
            positions[row, start : start + n] = np.arange(n)
            segment_ids[row, start : start + n] = seg
            spans.append((row, start, n, sequences[i]))
            start, i = start + n, i + 1
    logits = itune_logits(run["graphdef"], run["params"], packed, None, positions, segment_ids)
    ours = np.concatenate([logits[row, start : start + n] for row, start, n, _ in spans])
    theirs = np.concatenate([hf_logits(run["model"], seq[None])[0] for *_, seq in spans])
    packed_error = max_relative_error(ours, theirs)
    print(f"\n{family}: max relative error unpacked {unpacked:.2e}, packed {packed_error:.2e}")
    record(family, "unpacked", f"{unpacked:.1e}")
    record(family, "packed", f"{packed_error:.1e}")
    assert unpacked < TOLERANCE
    assert packed_error < TOLERANCE


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_feature_matters(built, family):
    """Without each feature under test (the value beside it in MATTERS), itune's logits leave
    transformers' by far more than the tolerance: the tiny models really exercise them."""
    run = built(family)
    tokens = np.stack(token_rows(1, [SEQ]))
    reference = hf_logits(run["model"], tokens)
    for field, value in MATTERS[family]:
        cfg = dataclasses.replace(run["cfg"], **{field: value})
        graphdef, _ = weights.abstract_params(cfg)
        error = max_relative_error(itune_logits(graphdef, run["params"], tokens), reference)
        assert error > 100 * TOLERANCE, (field, value, error)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_routing_is_uneven(built, family):
    """transformers' router sends the test tokens to every expert, in groups of different
    sizes (the grouped products' uneven case)."""
    run = built(family)
    model = run["model"]
    tokens = torch.tensor(np.stack(token_rows(1, [SEQ, SEQ])), dtype=torch.long)
    with torch.no_grad():
        out = model(tokens, output_router_logits=True)
    k = FAMILIES[family][1]["num_experts_per_tok"]
    for layer_logits in out.router_logits:
        chosen = torch.topk(layer_logits, k, dim=-1).indices.reshape(-1).numpy()
        counts = np.bincount(chosen, minlength=layer_logits.shape[-1])
        assert counts.min() > 0 and counts.max() >= 1.4 * counts.min(), counts


@pytest.mark.parametrize("family", ["gemma3", "mixtral", "qwen3_moe"])
def test_import_on_a_mesh_reads_only_each_devices_shard(built, family, monkeypatch):
    """Placed shard by shard on a mesh (experts over fsdp: the "ep" strategy), every parameter
    holds the one-device import's values, and the reader slices out the placed shards and
    nothing more (of each expert's tensor, of each norm...)."""
    run = built(family)
    read_elements = []
    read_part = hf._read_part

    def recording(tensor, kind, index, head_dim):
        part = read_part(tensor, kind, index, head_dim)
        read_elements.append(part.size)
        return part

    monkeypatch.setattr(hf, "_read_part", recording)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, _, params = hf.load_hf(run["path"], mesh=mesh, rules=sharding.STRATEGIES["ep"])
    placed = 0
    single = flat(run["params"])
    for path, variable in nnx.to_flat_state(params):
        value = variable.get_value()
        # A shard per device (a fully replicated array is read once).
        shards = (
            value.addressable_shards[:1] if value.is_fully_replicated else value.addressable_shards
        )
        placed += sum(shard.data.size for shard in shards)
        np.testing.assert_array_equal(np.asarray(value), single["/".join(map(str, path))])
    assert sum(read_elements) == placed
    if run["cfg"].num_experts:
        gate = params["blocks"]["moe"]["gate"].get_value()
        assert gate.sharding.spec[1] == "fsdp"  # [layers, experts, embed, mlp]
        assert gate.addressable_shards[0].data.shape[1] == run["cfg"].num_experts // 4


# ----------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_decoding_matches_generate(built, family):
    """itune's sampler (prefill, then one token at a time over the KV cache, two prompts of
    different lengths in one batch) picks transformers' greedy tokens, well past the window."""
    run = built(family)
    steps = 24
    prompts = token_rows(3, [6, 11])
    ours = sampler.generate(
        run["graphdef"],
        run["params"],
        [p.tolist() for p in prompts],
        sampler.SamplingConfig(max_new_tokens=steps),
        pad_id=0,
    )
    model = run["model"]
    model.generation_config.eos_token_id = None
    theirs = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor(prompt[None], dtype=torch.long),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                max_new_tokens=steps,
                do_sample=False,
            )
        theirs.append(out[0, len(prompt) :].tolist())
    assert all(len(t) == steps for t in theirs)
    window = run["cfg"].sliding_window
    assert len(prompts[0]) + steps > 2 * window or not window
    record(family, "greedy", "equal" if ours == theirs else "DIFFERENT")
    assert ours == theirs


# ----------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip(built, tmp_path, family):
    """import -> save_hf -> transformers: the same class and tensor names as transformers'
    own save, no missing, unexpected or misshapen weight and no warning, the very same logits;
    and itune reads its own export back unchanged."""
    run = built(family)
    hf.save_hf(str(tmp_path), run["cfg"], run["params"])
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    model = from_pretrained_cleanly(str(tmp_path))  # Fails on any of them.
    record(family, "round trip", "none")
    assert type(model) is type(run["model"])
    with safe_open(os.path.join(run["path"], hf.SINGLE_FILE), "np") as original:
        names = set(original.keys())
    assert set(hf.hf_tensor_shapes(run["cfg"])) == names
    tokens = np.stack(token_rows(1, [SEQ, SEQ]))
    assert max_relative_error(hf_logits(model, tokens), hf_logits(run["model"], tokens)) == 0.0
    cfg, _, params = hf.load_hf(str(tmp_path))
    assert cfg == run["cfg"]
    original = flat(run["params"])
    for name, value in flat(params).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


# ----------------------------------------------------------------------------------------------
# Training on a mesh


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_step_on_a_mesh_matches_one_device(built, family):
    """One step from the imported weights, on one device and on a 2 x 2 x 2 mesh."""
    cfg, params = built(family)["cfg"], built(family)["params"]
    # Segments longer than the windows, so that the windows bind.
    batch = packed_batch(0, batch=8, length=24, vocab=cfg.vocab_size, segment_lengths=(15, 7))
    # Plain SGD at learning rate 1: the update is the gradient itself. (Adam's first step is
    # about sign(gradient), which hides a wrong gradient and magnifies noise in tiny ones.)
    optim = optim_config(name="sgd", momentum=0.0, learning_rate=1.0, weight_decay=0.0)
    results = []
    for mesh_shape in ((1, 1, 1), MESH):
        _, state, run = jitted_train_step(cfg, optim, mesh_shape, params=params)
        init = jax.device_get(state.params)
        state, metrics = run(state, batch)
        results.append((init, jax.device_get(state), jax.device_get(metrics)))
    (ref_init, ref, ref_metrics), (init, got, metrics) = results
    for a, b in zip(jax.tree.leaves(ref_init), jax.tree.leaves(init)):
        np.testing.assert_array_equal(a, b)
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    leaves, ref_leaves = jax.tree.leaves(got), jax.tree.leaves(ref)
    assert len(leaves) == len(ref_leaves)
    diff = max(
        float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
        for a, b in zip(leaves, ref_leaves)
    )
    record(family, "mesh diff", f"{diff:.1e}")
    for a, b in zip(leaves, ref_leaves):
        np.testing.assert_allclose(a, b, rtol=MESH_TOLERANCE, atol=MESH_TOLERANCE)
    # The step really trained every parameter (the router, the q/k norms...).
    for path, before in flat_dict(ref_init).items():
        after = flat_dict(ref.params)[path]
        assert np.abs(after - before).max() > 0, path


def flat_dict(params) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


# ----------------------------------------------------------------------------------------------
# Configs


def test_old_and_new_config_forms_agree():
    """transformers 5's rope_parameters per layer type and layer_types read as the older
    rope_theta, rope_local_base_freq, rope_scaling and sliding_window_pattern; Qwen3-MoE's
    num_experts as num_local_experts; Gemma 3's default pattern is 5 sliding : 1 global."""
    base = dict(
        model_type="gemma3_text",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        head_dim=16,
        sliding_window=16,
    )
    old = hf.config_from_hf(
        dict(
            base,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling=dict(type="linear", factor=8.0),
            sliding_window_pattern=4,
        )
    )
    kinds = ["sliding_attention"] * 3 + ["full_attention"]
    new = hf.config_from_hf(
        dict(
            base,
            layer_types=kinds * 2,
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=1e4),
            },
        )
    )
    assert old == new
    assert (new.global_layer_every, new.rope_local_theta, new.rope_scaling) == (4, 1e4, "linear")
    default = hf.config_from_hf(base)
    assert (default.global_layer_every, default.rope_theta, default.rope_local_theta) == (
        6,
        1e6,
        1e4,
    )
    assert default.query_pre_attn_scalar == 256.0
    moe = dict(
        model_type="qwen3_moe",
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        moe_intermediate_size=32,
        num_experts_per_tok=2,
    )
    assert hf.config_from_hf(dict(moe, num_experts=6)) == hf.config_from_hf(
        dict(moe, num_local_experts=6)
    )
    assert hf.config_from_hf(dict(moe, num_experts=6)).num_experts == 6
    # Gemma 2: every second layer slides by default.
    gemma2 = hf.config_from_hf(dict(base, model_type="gemma2", num_hidden_layers=4))
    assert (gemma2.global_layer_every, gemma2.attn_logit_softcap) == (2, 50.0)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(model_type="qwen3_moe", decoder_sparse_step=2), "decoder_sparse_step"),
        (dict(model_type="qwen3_moe", mlp_only_layers=[1]), "mlp_only_layers"),
        (dict(model_type="mixtral", router_jitter_noise=0.1), "router_jitter_noise"),
        (
            dict(model_type="gemma2", layer_types=["full_attention", "sliding_attention"]),
            "layer_types",
        ),
        (
            dict(model_type="gemma3_text", layer_types=["sliding_attention", "chunked"]),
            "layer_types",
        ),
        (
            dict(model_type="qwen3", use_sliding_window=True, max_window_layers=1),
            "max_window_layers",
        ),
        (
            dict(model_type="gemma3_text", rope_scaling=dict(rope_type="dynamic", factor=4.0)),
            "rope_scaling.rope_type",
        ),
        (
            dict(
                model_type="gemma3_text",
                rope_parameters={
                    "full_attention": dict(rope_type="default"),
                    "sliding_attention": dict(rope_type="linear", factor=2.0),
                },
            ),
            "rope_parameters.sliding_attention.rope_type",
        ),
        (dict(model_type="gemma3_text", use_bidirectional_attention=True), "use_bidirectional"),
        (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
    ],
)
def test_unsupported_config_fields(change, field):
    hf_config = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts_per_tok=2,
        sliding_window=8,
        **change,
    )
    with pytest.raises(ValueError, match=f"config.json: {field}"):
        hf.config_from_hf(hf_config)


PRESETS = ["qwen3-0.6b", "qwen3-30b-a3b", "gemma2-2b", "gemma3-1b", "gemma3-27b", "mixtral-8x7b"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_export_as_transformers_reads_them(name, tmp_path):
    """Each preset's config.json reads back as the same ModelConfig, and transformers' own
    config class reads in it the layer pattern, RoPE and experts that itune computes."""
    cfg = ModelConfig(**presets.preset(name))
    hf_config = hf.config_to_hf(cfg)
    assert hf.config_from_hf(hf_config) == cfg
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert (
        type(theirs).__name__
        == {
            "qwen3": "Qwen3Config",
            "qwen3_moe": "Qwen3MoeConfig",
            "gemma2": "Gemma2Config",
            "gemma3_text": "Gemma3TextConfig",
            "mixtral": "MixtralConfig",
        }[hf_config["model_type"]]
    )
    sliding = [t == "sliding_attention" for t in getattr(theirs, "layer_types", None) or []]
    if cfg.global_layer_every:
        assert sliding == list(cfg.layer_is_sliding())
    if cfg.num_experts:
        assert theirs.num_local_experts == cfg.num_experts
        assert theirs.num_experts_per_tok == cfg.experts_per_token
    if name == "gemma3-27b":
        rope = theirs.rope_parameters
        assert rope["full_attention"]["rope_type"] == "linear"
        assert rope["full_attention"]["factor"] == 8.0
        assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
        assert theirs.query_pre_attn_scalar == 168.0


def test_export_refuses_what_no_family_computes():
    qwen3 = ModelConfig(**presets.preset("qwen3-0.6b"))
    gemma3 = ModelConfig(**presets.preset("gemma3-1b"))
    mixtral = ModelConfig(**presets.preset("mixtral-8x7b"))
    for cfg, field in (
        (dataclasses.replace(qwen3, final_logit_softcap=30.0), "final_logit_softcap"),
        (dataclasses.replace(gemma3, attn_logit_softcap=50.0), "attn_logit_softcap"),
        (dataclasses.replace(mixtral, router_renormalize=False), "router_renormalize"),
        (
            dataclasses.replace(mixtral, sliding_window=4096, global_layer_every=2),
            "global_layer_every",
        ),
        (
            dataclasses.replace(
                qwen3, rope_local_theta=10.0, sliding_window=8, global_layer_every=2
            ),
            "rope_local_theta",
        ),
    ):
        with pytest.raises(ValueError, match=field):
            hf.config_to_hf(cfg)


def test_parity_table():
    """Prints the table the tests above filled in (``pytest -s``)."""
    columns = ["unpacked", "packed", "greedy", "round trip", "mesh diff"]
    lines = [
        "| family | max rel err unpacked | packed | greedy | round-trip warnings | mesh diff |",
        "|---|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        row = RESULTS.get(family, {})
        lines.append(f"| {family} | " + " | ".join(row.get(c, "-") for c in columns) + " |")
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_lora_on_attention_and_experts_exports_merged(built, tmp_path, family):
    """LoRA on the attention and every expert's projections of an imported mixture (adapters
    made non-zero, as after training): the merged export, loaded by transformers, computes the
    logits that itune computes with the adapters."""
    run = built(family)
    cfg = dataclasses.replace(run["cfg"], lora_rank=4, lora_targets="q,v,o,gate,up,down")
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    rng = np.random.default_rng(3)

    def draw(path, a):  # A of PEFT's scale; B, zero when made, non-zero as after training.
        bound = 0.2 if "_lora_a" in jax.tree_util.keystr(path) else 0.02
        return rng.uniform(-bound, bound, a.shape).astype(a.dtype)

    adapters = jax.tree.map_with_path(draw, lora.adapters_only(nnx.state(abstract)))
    params = lora.with_adapters(run["params"], adapters)
    tokens = np.stack(token_rows(4, [SEQ, SEQ]))
    adapted = itune_logits(graphdef, params, tokens)
    assert max_relative_error(adapted, itune_logits(run["graphdef"], run["params"], tokens)) > 1e-3
    hf.save_hf(str(tmp_path), cfg, params)
    model = from_pretrained_cleanly(str(tmp_path))
    assert max_relative_error(adapted, hf_logits(model, tokens)) < TOLERANCE
