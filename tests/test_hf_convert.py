"""Hugging Face import and export against transformers itself.

Tiny random Llama (plain and with Llama-3 RoPE scaling), Mistral (sliding window), Qwen2 (q/k/v
bias, sliding window) and Gemma (GeGLU, 1 + w norms, scaled embeddings, one KV head, a head_dim
apart from d_model / heads) models are built and saved by transformers; itune's logits on GSM8K
text must match transformers' float32 logits. Then: the same import placed on meshes, the export
read back by transformers (with no missing or unexpected weights) and by itune, sharded files,
bfloat16, chat templates, tokenizers, and the errors.
"""

import doctest
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

from itune import sharding
from itune.convert import hf, tokenizer_files, weights
from itune.data import chat
from tests.util import (
    flat,
    from_pretrained_cleanly,
    hf_logits,
    itune_logits,
    max_relative_error,
)

transformers.utils.logging.disable_progress_bar()

BATCH, SEQ = 3, 48
TOLERANCE = 1e-4  # max |itune - transformers| / max |transformers|, float32.
COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,  # Large enough that attention is far from uniform.
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500_000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # head_dim 16: wavelengths 6, 33, 169, 875, ...: kept, interpolated and scaled ones.
    original_max_position_embeddings=512,
)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "llama3_rope": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, max_position_embeddings=4096),
    ),
    "mistral": (
        transformers.MistralConfig,
        dict(tie_word_embeddings=False, sliding_window=16, num_key_value_heads=4),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=12,
            max_window_layers=0,
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0),
        ),
    ),
    "gemma": (
        transformers.GemmaConfig,
        dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=24),
    ),
}
# save_pretrained shards these into several files (the index path of the import).
SHARDED = {"qwen2": "40KB"}


@pytest.fixture(scope="module")
def text_tokens(shared_dir):
    """GSM8K questions as UTF-8 bytes: ids below the tiny models' vocabulary of 300."""
    with open(shared_dir / "data" / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        questions = [json.loads(next(f))["question"].encode("utf-8") for _ in range(BATCH)]
    assert all(len(q) >= SEQ for q in questions)
    return np.array([list(q[:SEQ]) for q in questions], np.int32)


def build_hf_model(family: str, seed: int = 0):
    """A random transformers model whose norms and biases are random too (transformers makes
    them constant), so that a misplaced or mis-scaled one shows in the logits."""
    config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                center = 0.0 if family == "gemma" else 1.0  # Gemma scales by 1 + w.
                param.copy_(center + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory, text_tokens):
    """``get(family)``: a saved transformers model, its logits and itune's import (cached)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = build_hf_model(family)
            path = str(tmp_path_factory.mktemp(family))
            kwargs = {"max_shard_size": SHARDED[family]} if family in SHARDED else {}
            model.save_pretrained(path, **kwargs)
            cfg, graphdef, params = hf.load_hf(path)
            cache[family] = dict(
                model=model,
                path=path,
                reference=hf_logits(model, text_tokens),
                cfg=cfg,
                graphdef=graphdef,
                params=params,
            )
        return cache[family]

    return get


# ----------------------------------------------------------------------------------------------
# Import


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(built, text_tokens, family):
    run = built(family)
    cfg = run["cfg"]
    logits = itune_logits(run["graphdef"], run["params"], text_tokens)
    error = max_relative_error(logits, run["reference"])
    print(f"\n{family}: max relative error of itune's logits vs transformers' = {error:.2e}")
    assert error < TOLERANCE
    assert cfg.tie_embeddings == FAMILIES[family][1]["tie_word_embeddings"]
    expected = {
        "llama": dict(rope_scaling="none", norm_eps=1e-5),
        "llama3_rope": dict(rope_scaling="llama3", rope_theta=500_000.0, rope_original_max_len=512),
        "mistral": dict(sliding_window=16, num_kv_heads=4),
        "qwen2": dict(qkv_bias=True, sliding_window=12, rope_theta=1_000_000.0),
        "gemma": dict(
            norm_plus_one=True,
            embed_scale=True,
            mlp_activation="gelu_tanh",
            num_kv_heads=1,
            head_dim=24,
        ),
    }[family]
    assert {k: getattr(cfg, k) for k in expected} == expected
    if family in SHARDED:
        assert os.path.exists(os.path.join(run["path"], hf.INDEX_FILE))


def test_sliding_window_and_llama3_rope_matter(built, text_tokens):
    """The features under test change the logits: without them itune would not match."""
    import dataclasses

    for family, field, value in (
        ("mistral", "sliding_window", 0),
        ("qwen2", "sliding_window", 0),
        ("llama3_rope", "rope_scaling", "none"),
    ):
        run = built(family)
        cfg = dataclasses.replace(run["cfg"], **{field: value})
        graphdef, _ = weights.abstract_params(cfg)
        logits = itune_logits(graphdef, run["params"], text_tokens)
        assert max_relative_error(logits, run["reference"]) > 100 * TOLERANCE, family


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 1, 4)])
def test_import_on_mesh(built, text_tokens, mesh_shape):
    """Every family placed shard by shard on a mesh holds the same values as on one device;
    the logits of a sharded model match the one-device ones."""
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
    for family in sorted(FAMILIES):
        run = built(family)
        cfg, graphdef, params = hf.load_hf(run["path"], mesh=mesh)
        assert cfg == run["cfg"]
        single = flat(run["params"])
        sharded_any = False
        for path, variable in nnx.to_flat_state(params):
            name = "/".join(map(str, path))
            value = variable.get_value()
            sharded_any |= len(value.sharding.device_set) == 8 and not value.is_fully_replicated
            np.testing.assert_array_equal(np.asarray(value), single[name], err_msg=name)
        assert sharded_any, family
    for family in ("gemma", "qwen2"):
        run = built(family)
        _, graphdef, params = hf.load_hf(run["path"], mesh=mesh)
        one = itune_logits(run["graphdef"], run["params"], text_tokens)
        error = max_relative_error(itune_logits(graphdef, params, text_tokens, mesh), one)
        print(f"\n{family} on mesh {mesh_shape}: max relative error vs 1 device = {error:.2e}")
        assert error < 1e-5


def test_import_reads_only_each_devices_shard(built, monkeypatch):
    """On a mesh, the reader slices out each device's part of each layer and nothing more:
    the elements read add up to those of the placed shards."""
    run = built("mistral")  # Imported once already, before the recording starts.
    read_elements = []
    read_part = hf._read_part

    def recording(tensor, kind, index, head_dim):
        part = read_part(tensor, kind, index, head_dim)
        read_elements.append(part.size)
        return part

    monkeypatch.setattr(hf, "_read_part", recording)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, _, params = hf.load_hf(run["path"], mesh=mesh)
    placed = [
        shard.data.size
        for _, variable in nnx.to_flat_state(params)
        for shard in variable.get_value().addressable_shards
    ]
    assert sum(read_elements) == sum(placed)
    # The largest read is an eighth of the largest tensor (the embedding, over 4 x 2 devices).
    assert max(read_elements) == 300 * 64 // 8


def test_bfloat16_checkpoint(tmp_path, text_tokens):
    """bfloat16 safetensors (numpy through ml_dtypes) import exactly and export as bfloat16."""
    model = build_hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "in")
    cfg, graphdef, params = hf.load_hf(str(tmp_path / "in"))
    values = flat(params)
    state = model.state_dict()
    np.testing.assert_array_equal(
        values["embed"], state["model.embed_tokens.weight"].float().numpy()
    )
    np.testing.assert_array_equal(
        values["blocks/attn/o"][1].reshape(-1, 64).T,
        state["model.layers.1.self_attn.o_proj.weight"].float().numpy(),
    )
    hf.save_hf(str(tmp_path / "out"), cfg, params, dtype="bfloat16")
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    back = from_pretrained_cleanly(str(tmp_path / "out"))
    for name, tensor in back.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, state[name]), name


# ----------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip(built, text_tokens, tmp_path, family):
    """import -> save_hf -> transformers: same architecture, no missing or unexpected weight,
    the very same logits; and itune reads its own export back unchanged."""
    run = built(family)
    hf.save_hf(str(tmp_path), run["cfg"], run["params"])
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    model = from_pretrained_cleanly(str(tmp_path))
    assert type(model) is type(run["model"])
    error = max_relative_error(hf_logits(model, text_tokens), run["reference"])
    print(f"\n{family}: round trip, max relative error of transformers' logits = {error:.2e}")
    assert error == 0.0
    cfg, _, params = hf.load_hf(str(tmp_path))
    assert cfg == run["cfg"]
    original = flat(run["params"])
    for name, value in flat(params).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_multi_file_export(built, text_tokens, tmp_path):
    run = built("gemma")
    hf.save_hf(str(tmp_path), run["cfg"], run["params"], max_shard_bytes=60_000)
    with open(tmp_path / hf.INDEX_FILE) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3
    assert files == sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for file in files:  # Within the limit (plus the header), unless one tensor is larger.
        count = sum(f == file for f in index["weight_map"].values())
        assert count == 1 or os.path.getsize(tmp_path / file) < 60_000 + 4096, file
    assert set(index["weight_map"]) == set(hf.hf_tensor_shapes(run["cfg"]))
    model = from_pretrained_cleanly(str(tmp_path))
    assert max_relative_error(hf_logits(model, text_tokens), run["reference"]) == 0.0
    _, _, params = hf.load_hf(str(tmp_path))
    original = flat(run["params"])
    for name, value in flat(params).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_export_rejects_configs_without_an_equivalent(built):
    import dataclasses

    cfg = built("llama")["cfg"]
    with pytest.raises(ValueError, match="norm_plus_one"):
        hf.config_to_hf(dataclasses.replace(cfg, norm_plus_one=True))
    gemma = built("gemma")["cfg"]
    with pytest.raises(ValueError, match="sliding_window"):
        hf.config_to_hf(dataclasses.replace(gemma, sliding_window=8))
    qwen = hf.config_to_hf(built("qwen2")["cfg"])
    assert qwen["layer_types"] == ["sliding_attention"] * 2 and qwen["use_sliding_window"]


# ----------------------------------------------------------------------------------------------
# Configs


def test_docstring_examples():
    assert doctest.testmod(hf).failed == 0


def test_legacy_and_new_config_forms_agree():
    base = dict(model_type="llama", **COMMON)
    new = hf.config_from_hf({**base, "rope_parameters": dict(LLAMA3_ROPE)})
    legacy_scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    legacy = hf.config_from_hf({**base, "rope_theta": 500_000.0, "rope_scaling": legacy_scaling})
    older = dict(legacy_scaling, type="llama3")
    del older["rope_type"]
    oldest = hf.config_from_hf({**base, "rope_theta": 500_000.0, "rope_scaling": older})
    assert new == legacy == oldest
    assert (new.rope_scaling, new.rope_theta, new.rope_original_max_len) == ("llama3", 5e5, 512)
    gemma = dict(model_type="gemma", **COMMON, hidden_act="gelu", hidden_activation=None)
    assert hf.config_from_hf(gemma).mlp_activation == "gelu_tanh"
    # Qwen2 without use_sliding_window ignores its sliding_window.
    qwen = dict(model_type="qwen2", **COMMON, use_sliding_window=False, sliding_window=4096)
    assert hf.config_from_hf(qwen).sliding_window == 0
    # Mistral: an absent window is transformers' default of 4096, a null one none at all.
    mistral = dict(model_type="mistral", **COMMON)
    assert hf.config_from_hf(mistral).sliding_window == 4096
    assert hf.config_from_hf({**mistral, "sliding_window": None}).sliding_window == 0
    assert hf.config_from_hf(base, attention="jax").attention == "jax"


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
        (dict(rope_parameters=dict(rope_type="dynamic", factor=4.0)), "rope_parameters.rope_type"),
        (dict(rope_scaling=dict(type="longrope", factor=2.0)), "rope_scaling.rope_type"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(quantization_config=dict(quant_method="bitsandbytes")), "quantization_config"),
        (
            dict(model_type="qwen2", use_sliding_window=True, max_window_layers=1),
            "max_window_layers",
        ),
    ],
)
def test_unsupported_config_fields(change, field):
    hf_config = {**dict(model_type="llama", **COMMON), **change}
    hf_config = {k: v for k, v in hf_config.items() if v is not None}
    with pytest.raises(ValueError, match=f"config.json: {field}"):
        hf.config_from_hf(hf_config)


# ----------------------------------------------------------------------------------------------
# Checkpoint errors


def rewrite(path, change):
    """Rewrites ``path/model.safetensors`` with ``change(tensors)`` applied."""
    file = os.path.join(path, hf.SINGLE_FILE)
    tensors = safetensors.torch.load_file(file)
    change(tensors)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})


def test_checkpoint_errors(built, tmp_path):
    run = built("llama")
    hf.save_hf(str(tmp_path / "ok"), run["cfg"], run["params"])
    up = "model.layers.1.mlp.up_proj.weight"

    def case(name, change):
        path = tmp_path / name
        path.mkdir()
        for f in ("config.json", "model.safetensors"):
            (path / f).write_bytes((tmp_path / "ok" / f).read_bytes())
        rewrite(str(path), change)
        return str(path)

    missing = case("missing", lambda t: t.pop(up))
    with pytest.raises(ValueError, match=rf"tensor {up} \(128, 64\) is missing"):
        hf.load_hf(missing)
    misshapen = case("misshapen", lambda t: t.__setitem__(up, t[up][:100]))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor {up} has shape \(100, 64\)"):
        hf.load_hf(misshapen)
    extra = case("extra", lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", t[up].clone()))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.mlp.extra.weight'"):
        hf.load_hf(extra)
    # Old checkpoints' rotary buffers are no weights and pass.
    buffers = case(
        "buffers",
        lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)),
    )
    hf.load_hf(buffers)
    # An index naming a tensor that its file lacks.
    hf.save_hf(str(tmp_path / "sharded"), run["cfg"], run["params"], max_shard_bytes=50_000)
    index_file = tmp_path / "sharded" / hf.INDEX_FILE
    index = json.loads(index_file.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = first
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"model.layers.0.mlp.ghost.weight is listed in {first}"):
        hf.load_hf(str(tmp_path / "sharded"))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_bytes(
        (tmp_path / "ok" / "config.json").read_bytes()
    )
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        hf.load_hf(str(tmp_path / "no_weights"))


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2? "},
        {"role": "assistant", "content": "4\n"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]


@pytest.mark.parametrize("name", sorted(chat.FORMATS))
def test_chat_template_renders_like_itune(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    fmt = chat.get_format(name)
    template = tokenizer_files.chat_template(fmt)
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            turns = messages[:-1] if prompt else messages
            expected = chat.to_text(chat.render(turns, fmt, add_generation_prompt=prompt))
            (text,), _ = render_jinja_template(
                conversations=[turns], chat_template=template, add_generation_prompt=prompt
            )
            assert text == expected, (name, prompt)
    if name != "alpaca":
        assert chat.format_for_template(template) == name


def test_tokenizer_export_and_import(built, shared_dir, tmp_path):
    """SmolLM2's tokenizer (itune's vocab.json + merges.txt folder) exported with the chatml
    template: transformers tokenizes a chat as itune does, and load_hf_tokenizer reads it back."""
    run = built("llama")
    hf.save_hf(
        str(tmp_path),
        run["cfg"],
        run["params"],
        tokenizer=str(shared_dir / "tokenizers" / "smollm2_bpe"),
        chat_format="chatml",
    )
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tok, fmt = tokenizer_files.load_hf_tokenizer(str(tmp_path))
    # The folder's own template (chatml's), read back as the Jinja template it is.
    assert fmt.source == tokenizer_files.chat_template("chatml")
    ids, _ = chat.tokenize(chat.render(CONVERSATIONS[0], fmt), tok, fmt)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    hf_ids = hf_tok.apply_chat_template(CONVERSATIONS[0], tokenize=True, return_dict=False)
    assert list(ids) == list(hf_ids)
    assert hf_tok.decode(hf_ids) == chat.to_text(chat.render(CONVERSATIONS[0], fmt))
    # transformers 5 saves the template as chat_template.jinja: found there too.
    hf_tok.save_pretrained(str(tmp_path / "resaved"))
    assert tokenizer_files.load_hf_tokenizer(str(tmp_path / "resaved"))[1].source == fmt.source
    # Without a chat format, the folder's own (GGUF metadata) template is kept.
    hf.save_hf(
        str(tmp_path / "own"),
        run["cfg"],
        run["params"],
        tokenizer=str(shared_dir / "tokenizers" / "smollm2_bpe"),
    )
    own = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "own"))
    assert "You are a helpful AI assistant named SmolLM" in own.apply_chat_template(
        CONVERSATIONS[1], tokenize=False
    )
    # And a Hugging Face tokenizer folder is copied as it is, its template replaced.
    hf.save_hf(
        str(tmp_path / "again"),
        run["cfg"],
        run["params"],
        tokenizer=str(tmp_path),
        chat_format="gemma",
    )
    again = tokenizer_files.load_hf_tokenizer(str(tmp_path / "again"))[1]
    assert again.source == tokenizer_files.chat_template("gemma")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (
        tmp_path / "tokenizer.json"
    ).read_bytes()


def test_sentencepiece_tokenizer_export(built, shared_dir, tmp_path):
    """A SentencePiece tokenizer is written as tokenizer.model: itune reads it back as it was,
    and transformers' Llama tokenizer encodes text and chats as it does (a BPE model; runs of
    several spaces are where transformers' conversion still differs)."""
    from itune.data.tokenizer import SentencePieceTokenizer

    run = built("llama")
    model_file = shared_dir / "tokenizers" / "bpe_32000_mistral_v1.model"
    tok = SentencePieceTokenizer.from_file(str(model_file))
    hf.save_hf(str(tmp_path), run["cfg"], run["params"], tokenizer=tok, chat_format="mistral")
    assert (tmp_path / "tokenizer.model").read_bytes() == model_file.read_bytes()
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    back, template = tokenizer_files.load_hf_tokenizer(str(tmp_path))
    assert isinstance(back, SentencePieceTokenizer)
    assert template.source == tokenizer_files.chat_template("mistral")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many.",
        "Café 😀 x",
    ):
        assert back.encode(text) == tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
    fmt = chat.get_format("mistral")
    text = chat.to_text(chat.render(CONVERSATIONS[1], fmt))
    assert hf_tok.apply_chat_template(CONVERSATIONS[1], tokenize=False) == text
    ids, _ = chat.tokenize(chat.render(CONVERSATIONS[1], fmt), tok, fmt)
    hf_ids = hf_tok.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=False)
    assert list(ids) == list(hf_ids)
