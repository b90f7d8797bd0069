"""GGUF import: SmolLM2-135M-Instruct (Q4_1) against transformers' GGUF loader, tiny written files.

The real file (../shared) gives the config, logit and greedy-decoding parity with transformers
and the tokenizer; small GGUF files written here with `gguf.GGUFWriter` cover layout (llama.cpp's
q/k permutation, an untied output, several quantization types, a sharded load), Llama 3 RoPE
scaling and the errors.
"""

import dataclasses
import json
import re

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itune import sharding
from itune.convert import gguf as gguf_import
from itune.convert.weights import host_params
from itune.data import chat

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def messages(question: str) -> list[dict]:
    # SmolLM2's template adds this system turn when there is none; itune's chatml does not.
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


# --- The real SmolLM2 file ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path(shared_dir):
    path = shared_dir / "models" / "smollm2-135m-instruct" / GGUF_NAME
    assert path.is_file(), f"{path} is missing from the shared folder"
    return path


@pytest.fixture(scope="module")
def itune_model(gguf_path):
    return gguf_import.load_gguf(gguf_path)


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return gguf_import.load_gguf_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is None:
        pytest.fail("transformers loads a GGUF model only with accelerate installed (test extra)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def questions(shared_dir):
    """A question of GSM8K, an instruction of self-instruct's seed tasks, and a short one."""

    def first(name):
        with open(shared_dir / "data" / name, encoding="utf-8") as f:
            return json.loads(f.readline())

    return [
        first("gsm8k/train.jsonl")["question"],
        first("self_instruct/seed_tasks.jsonl")["instruction"],
        "What is the capital of France?",
    ]


@pytest.fixture(scope="module")
def prompts(tokenizer, questions):
    """ChatML prompts (with SmolLM2's system turn) ending in an open assistant turn."""
    tok, _ = tokenizer
    return [chat.prompt_ids(messages(q), tok, chat.CHATML) for q in questions]


def test_config_from_metadata(gguf_path, itune_model):
    cfg = gguf_import.gguf_config(gguf_path)
    assert cfg == itune_model[0]
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert (cfg.mlp_dim, cfg.vocab_size, cfg.max_seq_len) == (1536, 49152, 8192)
    assert cfg.rope_theta == 100_000.0 and cfg.rope_scaling == "none"
    assert np.float32(cfg.norm_eps) == np.float32(1e-5)
    assert cfg.tie_embeddings and cfg.mlp_activation == "silu" and not cfg.qkv_bias
    assert not cfg.norm_plus_one and not cfg.embed_scale and cfg.sliding_window == 0
    assert cfg.num_params() == 134_515_008  # SmolLM2-135M.


def test_logits_match_transformers(itune_model, hf_model, prompts):
    import torch

    _, graphdef, params = itune_model
    length = max(map(len, prompts))
    tokens = np.full((len(prompts), length), 2, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    ours = np.asarray(
        nnx.merge(graphdef, params)(tokens, positions, np.ones_like(tokens)), np.float32
    )
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    # Padding follows each prompt, so causal attention keeps it out of the prompt's logits.
    errors = [
        np.abs(ours[i, : len(p)] - theirs[i, : len(p)]).max() / np.abs(theirs[i, : len(p)]).max()
        for i, p in enumerate(prompts)
    ]
    print(f"\nmax relative logit error vs transformers (float32): {max(errors):.3g}")
    assert max(errors) < 1e-4
    # The next-token predictions agree too.
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(ours[i, : len(p)].argmax(-1), theirs[i, : len(p)].argmax(-1))


def test_greedy_generation_matches_transformers(itune_model, hf_model, tokenizer, prompts):
    import torch

    from itune.evaluation import sampler

    _, graphdef, params = itune_model
    tok, _ = tokenizer
    ours = sampler.generate(
        graphdef,
        params,
        [p.tolist() for p in prompts],
        sampler.SamplingConfig(max_new_tokens=32, stop_ids=(tok.eos_id,)),
        pad_id=tok.pad_id,
    )
    theirs = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt.tolist()]),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                do_sample=False,
                max_new_tokens=32,
                eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id,
            )
        generated = out[0, len(prompt) :].tolist()
        theirs.append(
            generated[: generated.index(tok.eos_id)] if tok.eos_id in generated else generated
        )
    for prompt, a, b in zip(prompts, ours, theirs):
        print(f"\n{len(a)} tokens, equal={a == b}: {tok.decode(a)!r}")
    assert ours == theirs
    assert all(len(a) > 0 for a in ours)


def splits_numbers_apart(text: str) -> bool:
    """Whether SmolLM2's pre-tokenizer (llama.cpp's 'smollm': numbers split off singly first, as
    in SmolLM2's own tokenizer.json) can split ``text`` otherwise than GPT-2's regex, which
    transformers' GGUF tokenizer falls back to for 'smollm'. They differ on a number after
    two spaces (one run of spaces vs a space and " 1") and on a non-ASCII number such as "¼"
    after a space (where GPT-2's regex keeps " ¼" together)."""
    return any(
        c.isnumeric()
        and text[i - 1 : i].isspace()
        and (text[i - 2 : i - 1].isspace() or c not in "0123456789")
        for i, c in enumerate(text)
    )


def test_tokenizer_matches_transformers(shared_dir, tokenizer, hf_tokenizer):
    from tokenizers import pre_tokenizers

    from itune.data.jinja_template import ChatTemplate

    tok, fmt = tokenizer
    # The file's own template (SmolLM2's ChatML with its default system turn).
    assert isinstance(fmt, ChatTemplate) and "<|im_start|>" in fmt.source
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.add_bos_token is False
    texts = []
    with open(shared_dir / "data" / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    texts += [
        "<|im_start|>user\nHow many are 12 + 30?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n",
        "<|endoftext|><repo_name>itune<file_sep>x = 1<jupyter_code>",
        "Café, naïve — 你好，世界！ 😀👍🏽 \t\r\n  trailing  ",
    ]
    ours = [tok.encode(t) for t in texts]
    theirs = hf_tokenizer(texts, add_special_tokens=False)["input_ids"]
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    print(
        f"\n{len(texts)} texts: {len(texts) - len(differ)} encode as transformers' GGUF "
        f"tokenizer does; {len(differ)} differ, all where it does not split numbers apart"
    )
    assert all(splits_numbers_apart(texts[i]) for i in differ)
    assert len(texts) - len(differ) > 14_800
    # With SmolLM2's own pre-tokenizer, transformers' tokenizer agrees on every text.
    backend = hf_tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    assert ours == [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    # Control tokens are single ids, decoded back to themselves.
    for token_id in range(17):
        token = hf_tokenizer.convert_ids_to_tokens(token_id)
        assert tok.encode(token) == [token_id] and tok.decode([token_id]) == token
    assert tok.decode(ours[0]) == texts[0]


def test_chatml_renders_as_the_gguf_chat_template(tokenizer, hf_tokenizer, questions, prompts):
    tok, fmt = tokenizer
    for question, prompt in zip(questions, prompts):
        expected = hf_tokenizer.apply_chat_template(
            messages(question), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert prompt.tolist() == list(expected)
    conversation = messages("What is 2+2?") + [{"role": "assistant", "content": "4"}]
    ids, _ = chat.tokenize(chat.render(conversation, chat.get_format(fmt)), tok, chat.CHATML)
    expected = hf_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert ids.tolist() == list(expected)


def test_the_files_own_template_is_rendered_as_transformers_renders_it(
    tokenizer, hf_tokenizer, questions
):
    """With no system turn SmolLM2's template adds its own: itune's prompts and training chats
    are transformers' token for token, and the answer and end of turn are what is trained."""
    tok, template = tokenizer
    assert isinstance(template, chat.ChatTemplate)
    for question in questions:
        chat_ = [{"role": "user", "content": question}]
        expected = hf_tokenizer.apply_chat_template(
            chat_, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert chat.prompt_ids(chat_, tok, template).tolist() == list(expected)
        assert "You are a helpful AI assistant named SmolLM" in tok.decode(expected)
    conversation = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ids, mask = chat.tokenize(chat.render(conversation, template), tok, template)
    expected = hf_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert ids.tolist() == list(expected)
    assert tok.decode(ids[mask == 1]) == "4<|im_end|>"
    assert template.stop_ids(tok) == (2,)  # <|im_end|>, also the file's EOS.


# --- Small files written here ------------------------------------------------------------------

TINY = dict(vocab=256, d=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128)
Q = gguf.GGMLQuantizationType
# A storage type per tensor kind (norms are F32): every path of the reader.
TINY_TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.Q8_0,
    "attn_q": Q.Q4_1,
    "attn_k": Q.Q4_0,
    "attn_v": Q.F16,
    "attn_output": Q.Q5_0,
    "ffn_gate": Q.Q5_1,
    "ffn_up": Q.BF16,
    "ffn_down": Q.Q8_0,
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permutation of q/k rows, for interleaved RoPE."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face LLaMA weights (torch Linear layout, float32), by GGUF tensor name."""
    rng = np.random.default_rng(seed)
    t = TINY
    q, kv = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]

    def normal(*shape):
        return rng.normal(0, shape[-1] ** -0.5, shape).astype(np.float32)

    def scale():
        return rng.uniform(0.5, 1.5, t["d"]).astype(np.float32)

    weights = {
        "token_embd.weight": normal(t["vocab"], t["d"]),
        "output.weight": normal(t["vocab"], t["d"]),
        "output_norm.weight": scale(),
    }
    for i in range(t["layers"]):
        weights |= {
            f"blk.{i}.attn_norm.weight": scale(),
            f"blk.{i}.ffn_norm.weight": scale(),
            f"blk.{i}.attn_q.weight": normal(q, t["d"]),
            f"blk.{i}.attn_k.weight": normal(kv, t["d"]),
            f"blk.{i}.attn_v.weight": normal(kv, t["d"]),
            f"blk.{i}.attn_output.weight": normal(t["d"], q),
            f"blk.{i}.ffn_gate.weight": normal(t["mlp"], t["d"]),
            f"blk.{i}.ffn_up.weight": normal(t["mlp"], t["d"]),
            f"blk.{i}.ffn_down.weight": normal(t["d"], t["mlp"]),
        }
    return weights


def write_gguf(path, weights, arch="llama", metadata=None, extra_tensors=None):
    """A GGUF as llama.cpp writes one (q/k rows permuted, types from TINY_TYPES); returns the
    float32 values, in Hugging Face layout, that its tensors hold. ``metadata`` adds to or
    replaces the keys (None removes one)."""
    t = TINY
    keys = {
        f"{arch}.block_count": t["layers"],
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": t["d"],
        f"{arch}.feed_forward_length": t["mlp"],
        f"{arch}.attention.head_count": t["heads"],
        f"{arch}.attention.head_count_kv": t["kv_heads"],
        f"{arch}.rope.dimension_count": t["head_dim"],
        f"{arch}.vocab_size": t["vocab"],
        f"{arch}.rope.freq_base": 10_000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
    }
    keys |= metadata or {}
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif value is not None:
            writer.add_uint32(key, value)
    held = {}
    for name, w in weights.items():
        kind = name.split(".")[-2]
        qtype = TINY_TYPES.get(kind, Q.F32) if w.ndim == 2 else Q.F32
        # Blocks run along rows, so permuting rows commutes with quantizing them.
        data = gguf.quants.quantize(w, qtype)
        held[name] = gguf.quants.dequantize(data, qtype).reshape(w.shape).astype(np.float32)
        if kind in ("attn_q", "attn_k"):
            data = llama_cpp_permute(data, t["heads"] if kind == "attn_q" else t["kv_heads"])
        writer.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
    for name, w in (extra_tensors or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def hf_logits(held: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """transformers' LlamaForCausalLM with these weights (an independent reference)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t = TINY
    config = LlamaConfig(
        vocab_size=t["vocab"],
        hidden_size=t["d"],
        intermediate_size=t["mlp"],
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        num_key_value_heads=t["kv_heads"],
        head_dim=t["head_dim"],
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    names = {
        "token_embd": "model.embed_tokens",
        "output": "lm_head",
        "output_norm": "model.norm",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    state = {}
    for name, w in held.items():
        parts = name.split(".")
        if parts[0] == "blk":
            key = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
        else:
            key = f"{names[parts[0]]}.weight"
        state[key] = torch.from_numpy(w)
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def test_tiny_file_layout_types_and_sharded_load(tmp_path):
    path = tmp_path / "tiny.gguf"
    held = write_gguf(path, tiny_weights())
    cfg, graphdef, params = gguf_import.load_gguf(path)
    assert not cfg.tie_embeddings and cfg.vocab_size == TINY["vocab"]
    tokens = np.random.default_rng(1).integers(0, TINY["vocab"], (2, 24)).astype(np.int32)
    positions = np.broadcast_to(np.arange(24, dtype=np.int32), tokens.shape)
    ours = np.asarray(nnx.merge(graphdef, params)(tokens, positions, np.ones_like(tokens)))
    theirs = hf_logits(held, tokens)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5
    # Shard by shard over a mesh (heads, mlp and vocab over 'tensor', d_model over 'fsdp'): the
    # same values, in bfloat16 as asked.
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg, _, sharded = gguf_import.load_gguf(
        path, mesh=mesh, param_dtype="bfloat16", scan_layers=False
    )
    assert cfg.param_dtype == "bfloat16" and not cfg.scan_layers
    q = sharded["blocks"]["attn"]["q"].get_value()
    assert q.dtype == jnp.bfloat16 and len(q.sharding.device_set) == 8
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    for (name, a), (_, b) in zip(host_params(params), host_params(sharded)):
        np.testing.assert_array_equal(a.astype(jnp.bfloat16), b, err_msg=name)


def test_a_file_is_parsed_once_and_again_when_rewritten(tmp_path, monkeypatch):
    parsed = []
    reader = gguf_import._Reader
    monkeypatch.setattr(gguf_import, "_Reader", lambda p: parsed.append(p) or reader(p))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_weights(0))
    first = host_params(gguf_import.load_gguf(path)[2])
    assert gguf_import.gguf_config(path).vocab_size == TINY["vocab"]
    assert len(parsed) == 1
    write_gguf(path, tiny_weights(1), metadata={"general.name": "rewritten"})
    second = host_params(gguf_import.load_gguf(path)[2])
    assert len(parsed) == 2
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(first, second))


def llama3_factors(theta, head_dim, factor, low, high, original) -> np.ndarray:
    """The rope_freqs.weight convert_hf_to_gguf.py writes for Llama 3 scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("factor,low,high", [(32.0, 1.0, 4.0), (8.0, 2.0, 8.0)])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, factor, low, high):
    # Llama 3's shape of RoPE (head_dim 64, theta 500000): several frequencies between bands.
    metadata = {
        "llama.embedding_length": 256,
        "llama.rope.dimension_count": 64,
        "llama.rope.freq_base": 500_000.0,
    }
    rope = {"rope_freqs.weight": llama3_factors(500_000.0, 64, factor, low, high, 8192)}
    write_gguf(tmp_path / "l3.gguf", {}, metadata=metadata, extra_tensors=rope)
    cfg = gguf_import.gguf_config(tmp_path / "l3.gguf")
    assert (cfg.head_dim, cfg.rope_scaling, cfg.rope_original_max_len) == (64, "llama3", 8192)
    assert cfg.rope_scaling_factor == pytest.approx(factor)
    assert cfg.rope_low_freq_factor == pytest.approx(low, rel=1e-3)
    assert cfg.rope_high_freq_factor == pytest.approx(high, rel=1e-3)
    # Factors that no Llama 3 scaling gives are refused.
    bogus = {"rope_freqs.weight": np.linspace(1, 3, 32, dtype=np.float32)}
    write_gguf(tmp_path / "bad.gguf", {}, metadata=metadata, extra_tensors=bogus)
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        gguf_import.gguf_config(tmp_path / "bad.gguf")


def _without(name):
    weights = tiny_weights()
    del weights[name]
    return weights


def _reshaped(name, shape):
    weights = tiny_weights()
    weights[name] = np.zeros(shape, np.float32)
    return weights


@pytest.mark.parametrize(
    "write,match",
    [
        (dict(arch="phi3"), "general.architecture is 'phi3'"),
        (dict(weights=_without("blk.1.ffn_up.weight")), "no tensor 'blk.1.ffn_up.weight'"),
        (dict(weights=_without("output_norm.weight")), "no tensor 'output_norm.weight'"),
        (dict(weights=_reshaped("blk.0.attn_v.weight", (64, 64))), "'blk.0.attn_v.weight' has"),
        (
            dict(extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)}),
            "blk.0.attn_q.bias",
        ),
        (dict(metadata={"llama.block_count": None}), "llama.block_count"),
        (dict(metadata={"llama.expert_count": 8}), "llama.expert_count"),
        (
            dict(metadata={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}),
            "llama.rope.scaling.type",
        ),
        (dict(metadata={"llama.rope.dimension_count": 8}), "llama.rope.dimension_count"),
    ],
)
def test_load_errors_name_the_field_or_tensor(tmp_path, write, match):
    write = dict(write)
    path = tmp_path / "bad.gguf"
    write_gguf(path, write.pop("weights", None) or tiny_weights(), **write)
    with pytest.raises(ValueError, match=re.escape(match)):
        gguf_import.load_gguf(path)


def test_tokenizer_errors_and_chat_formats(tmp_path):
    path = tmp_path / "spm.gguf"
    write_gguf(path, {}, metadata={"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        gguf_import.load_gguf_tokenizer(path)
    with pytest.raises(FileNotFoundError):
        gguf_import.load_gguf(tmp_path / "absent.gguf")
    write_gguf(tmp_path / "tiny.gguf", {})
    with pytest.raises(ValueError, match="rope_thetaa"):
        gguf_import.gguf_config(tmp_path / "tiny.gguf", rope_thetaa=1.0)
    templates = {
        "{{ '<|im_start|>' + message['role'] }}": "chatml",
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}": "llama3",
        "{{ '<start_of_turn>' + role }}": "gemma",
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}": "mistral",
        "{{ message['content'] }}": None,
        None: None,
    }
    for template, name in templates.items():
        assert chat.format_for_template(template) == name
        assert name is None or name in chat.FORMATS


# --- Qwen3, Qwen3-MoE, Gemma 2 and Gemma 3 files, written from transformers models ------------
#
# Each file is written as llama.cpp's convert_hf_to_gguf.py writes one (its tensor names and
# metadata keys, Gemma's norms stored as 1 + w, experts stacked) from a tiny random transformers
# model, with a tokenizer trained here; then transformers' GGUF loader and itune's read the same
# file. Shapes follow what transformers reads from these files: it takes no head_dim from a
# qwen3 file (Qwen3Config's 128), no expert width from a qwen3moe file (768), and no
# query_pre_attn_scalar from a Gemma file (256, which llama.cpp takes from the head dimension).

FAMILY_TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.F16,
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q5_0,
    "attn_v": Q.F16,
    "attn_output": Q.Q4_1,
    "ffn_gate": Q.BF16,
    "ffn_up": Q.Q8_0,
    "ffn_down": Q.Q5_1,
    "ffn_gate_exps": Q.Q8_0,
    "ffn_up_exps": Q.F16,
    "ffn_down_exps": Q.Q8_0,
}
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def family_config(arch: str):
    """A tiny transformers config of the family llama.cpp calls ``arch``: windows shorter than
    the test's rows, experts with top-2 of 4, Gemma 3's 5 local : 1 global with a remainder."""
    from transformers import Gemma2Config, Gemma3TextConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    if arch == "qwen3":
        return Qwen3Config(
            **common,
            num_hidden_layers=2,
            head_dim=128,
            intermediate_size=128,
            rope_theta=1_000_000.0,
            tie_word_embeddings=False,
        )
    if arch == "qwen3moe":
        return Qwen3MoeConfig(
            **common,
            num_hidden_layers=2,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=768,
            norm_topk_prob=True,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
        )
    gemma = dict(
        common,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        intermediate_size=128,
        query_pre_attn_scalar=256,
        sliding_window=4,
        tie_word_embeddings=True,
    )
    if arch == "gemma2":
        return Gemma2Config(
            **gemma,
            num_hidden_layers=2,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    return Gemma3TextConfig(**gemma, num_hidden_layers=7, rope_theta=1_000_000.0)


def family_model(arch: str, vocab_size: int, seed: int = 0):
    """The transformers model, with random weights large enough that Gemma 2's soft-caps bind."""
    import torch
    from transformers import AutoModelForCausalLM

    config = family_config(arch)
    config.vocab_size = vocab_size
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gemma = arch.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma scales by 1 + w, the others by w.
                p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, (3.0 if gemma else 1.0) * p.shape[-1] ** -0.5)
        if arch == "gemma2":
            model.model.norm.weight.uniform_(2.0, 4.0)
    return model


def byte_level_vocab(texts: list[str], size: int = 400, split: str | None = None):
    """A byte-level BPE trained on ``texts`` with the regex ``split`` (Qwen2's by default):
    (tokens, types, merges)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from itune.convert.gguf_tokenizer import _QWEN2_SPLIT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split or _QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    data = json.loads(tok.to_str())["model"]
    tokens = sorted(data["vocab"], key=data["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["merges"]]
    specials = CHATML_SPECIALS + ["<think>", "</think>"]
    types = [1] * len(tokens) + [3] * len(CHATML_SPECIALS) + [4, 4]
    return tokens + specials, types, merges


def sentencepiece_vocab(texts: list[str], size: int = 400):
    """A SentencePiece-style vocabulary as Gemma's GGUF holds one: (tokens, types, scores), the
    specials first, then byte-fallback pieces, pieces with "▁" for a space, and a token of two
    plain spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=size, show_progress=False)
    )
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tokens = GEMMA_SPECIALS + byte_pieces + pieces + ["  "]
    types = [3, 3, 3, 2, 3, 3, 3] + [6] * 256 + [1] * (len(pieces) + 1)
    return tokens, types, [-float(n) for n in range(len(tokens))]


def family_texts(shared_dir) -> list[str]:
    with open(shared_dir / "data" / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(200), f)]
    return [r["question"] + "\n" + r["answer"] for r in rows]


def add_tokenizer(writer, vocab, model: str, pre: str) -> None:
    """The tokenizer keys llama.cpp writes: a SentencePiece vocabulary with its scores (Gemma's
    ids), or a byte-level one with its merges (Qwen's ids)."""
    tokens, types, extra = vocab
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_token_scores(extra)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(True)
    else:
        writer.add_token_merges(extra)
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(False)


def write_family_gguf(path, arch: str, model, vocab, template: str) -> None:
    """``model`` (transformers) and ``vocab`` as convert_hf_to_gguf.py writes an ``arch`` file;
    ``model``'s weights become the values the file's quantized tensors hold."""
    import torch

    config = model.config
    gemma = arch.startswith("gemma")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if arch == "qwen3moe":
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    else:
        writer.add_feed_forward_length(config.intermediate_size)
    if arch != "gemma2":  # llama.cpp writes no RoPE base for Gemma 2 (10000).
        writer.add_rope_freq_base(config.rope_parameters.get("rope_theta") or 1_000_000.0)
    if gemma:
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    add_tokenizer(writer, vocab, "llama" if gemma else "gpt2", "default" if gemma else "qwen2")
    writer.add_chat_template(template)

    arch_id = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    state = model.state_dict()
    pieces = []  # (GGUF name, transformers name, its rows in that tensor)
    for hf_name, value in state.items():
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if hf_name.endswith("mlp.experts.gate_up_proj"):  # (experts, 2 * width, d): gate, up.
            width = value.shape[1] // 2
            pieces.append((f"blk.{layer}.ffn_gate_exps.weight", hf_name, slice(0, width)))
            pieces.append((f"blk.{layer}.ffn_up_exps.weight", hf_name, slice(width, None)))
        elif hf_name.endswith("mlp.experts.down_proj"):
            pieces.append((f"blk.{layer}.ffn_down_exps.weight", hf_name, slice(None)))
        else:
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            assert name is not None, hf_name
            pieces.append((name, hf_name, None))
    for name, hf_name, rows in pieces:
        value = state[hf_name] if rows is None else state[hf_name][:, rows]
        w = value.numpy().astype(np.float32)
        if w.ndim == 1:
            # convert_hf_to_gguf.py stores Gemma's norms as 1 + w.
            writer.add_tensor(name, w + 1 if gemma else w)
            continue
        qtype = FAMILY_TYPES.get(name.split(".")[-2], Q.F32)  # The router stays float32.
        data = gguf.quants.quantize(np.ascontiguousarray(w), qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
        # The model keeps what the file holds, so that it is the reference for both readers.
        held = gguf.quants.dequantize(data, qtype).reshape(w.shape)
        value.copy_(torch.from_numpy(held.astype(np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FAMILY_STRINGS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "<|im_start|>user\nHow many are 12 + 30?<|im_end|>\n<|im_start|>assistant\n<think>\n</think>",
    "<start_of_turn>user\nWhat is 7 x 6?<end_of_turn>\n<start_of_turn>model\n42<end_of_turn>",
    "Café, naïve — 你好，世界！ 😀  two  spaces,\ttabs\r\n and 123456789 digits",
]


# What each file's metadata gives (beyond the sizes), llama.cpp's fixed values included.
FAMILY_FIELDS = {
    "qwen3": dict(qk_norm=True, post_norms=False, head_dim=128, tie_embeddings=False),
    "qwen3moe": dict(
        qk_norm=True, num_experts=4, experts_per_token=2, mlp_dim=768, router_renormalize=True
    ),
    "gemma2": dict(
        norm_plus_one=True,
        embed_scale=True,
        post_norms=True,
        qk_norm=False,
        mlp_activation="gelu_tanh",
        query_pre_attn_scalar=256.0,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        sliding_window=4,
        global_layer_every=2,
        rope_theta=10_000.0,
    ),
    "gemma3": dict(
        qk_norm=True,
        post_norms=True,
        attn_logit_softcap=0.0,
        final_logit_softcap=0.0,
        sliding_window=4,
        global_layer_every=6,
        rope_theta=1_000_000.0,
        rope_local_theta=10_000.0,
        rope_scaling="none",
    ),
}


@pytest.mark.parametrize("arch", ["qwen3", "qwen3moe", "gemma2", "gemma3"])
def test_family_file_matches_transformers(tmp_path, shared_dir, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = family_texts(shared_dir)
    gemma = arch.startswith("gemma")
    vocab = sentencepiece_vocab(texts) if gemma else byte_level_vocab(texts)
    template = shared_dir / "chat_templates" / f"{'gemma3' if gemma else 'qwen3'}.jinja"
    model = family_model(arch, len(vocab[0]))
    path = tmp_path / f"{arch}.gguf"
    write_family_gguf(path, arch, model, vocab, template.read_text())

    tokens = np.random.default_rng(0).integers(0, len(vocab[0]), (2, 16)).astype(np.int32)
    theirs_model = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = theirs_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
        # transformers reads back the model the file was written from.
        written = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert np.abs(theirs - written).max() / np.abs(written).max() < 1e-5

    cfg, graphdef, params = gguf_import.load_gguf(path)
    assert {k: getattr(cfg, k) for k in FAMILY_FIELDS[arch]} == FAMILY_FIELDS[arch]
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    ours = np.asarray(nnx.merge(graphdef, params)(tokens, positions, np.ones_like(tokens)))
    error = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"\n{arch}: max relative logit error vs transformers on the same file: {error:.3g}")
    assert error < 1e-4

    tokenizer, chat_template = gguf_import.load_gguf_tokenizer(path)
    assert chat_template.source == template.read_text()
    their_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    strings = FAMILY_STRINGS + texts[:20]
    ours = [tokenizer.encode(s) for s in strings]
    assert ours == their_tokenizer(strings, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.decode(ids) == s for ids, s in zip(ours, strings))


def write_metadata(path, arch: str, keys: dict, tensors: dict | None = None) -> None:
    """A GGUF of ``arch`` holding only the metadata ``keys`` (without the arch prefix)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    for name, w in (tensors or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_keys(arch: str, p: dict) -> dict:
    """The keys convert_hf_to_gguf.py writes for the model a preset describes: none for what
    llama.cpp fixes by architecture (Gemma's query scaling, window pattern, local RoPE base)."""
    keys = {
        "vocab_size": p["vocab_size"],
        "context_length": p["max_seq_len"],
        "embedding_length": p["d_model"],
        "block_count": p["num_layers"],
        "feed_forward_length": p["mlp_dim"],
        "attention.head_count": p["num_heads"],
        "attention.head_count_kv": p["num_kv_heads"],
        "attention.key_length": p["head_dim"],
        "attention.value_length": p["head_dim"],
        "attention.layer_norm_rms_epsilon": p["norm_eps"],
        "rope.freq_base": p["rope_theta"],
    }
    if p.get("num_experts"):
        keys |= {
            "feed_forward_length": 6144,  # Qwen3-MoE's unused intermediate_size.
            "expert_count": p["num_experts"],
            "expert_used_count": p["experts_per_token"],
            "expert_feed_forward_length": p["mlp_dim"],
        }
    if p.get("sliding_window"):
        keys["attention.sliding_window"] = p["sliding_window"]
    if p.get("attn_logit_softcap"):
        keys["attn_logit_softcapping"] = p["attn_logit_softcap"]
        keys["final_logit_softcapping"] = p["final_logit_softcap"]
    if p.get("rope_scaling") == "linear":
        keys |= {"rope.scaling.type": "linear", "rope.scaling.factor": p["rope_scaling_factor"]}
    return keys


@pytest.mark.parametrize(
    "arch,name",
    [
        ("qwen3", "qwen3-0.6b"),
        ("qwen3", "qwen3-8b"),
        ("qwen3moe", "qwen3-30b-a3b"),
        ("gemma2", "gemma2-2b"),
        ("gemma3", "gemma3-1b"),
        ("gemma3", "gemma3-4b"),
        ("gemma3", "gemma3-27b"),  # Queries scaled by d_model / heads = 168, not head_dim.
    ],
)
def test_metadata_of_published_models_gives_their_presets(tmp_path, arch, name):
    from itune.model import presets
    from itune.model.decoder import ModelConfig

    p = presets.preset(name)
    untied = {} if p["tie_embeddings"] else {"output.weight": np.zeros((1, 1), np.float32)}
    write_metadata(tmp_path / "m.gguf", arch, llama_cpp_keys(arch, p), untied)
    expected = dataclasses.replace(ModelConfig(**p), router_aux_loss_coef=0.0)
    assert gguf_import.gguf_config(tmp_path / "m.gguf") == expected


def test_gemma_values_llama_cpp_fixes_or_defaults(tmp_path):
    # Gemma 2 27B (46 layers): queries scaled by d_model / heads = 144; no soft-caps or window
    # in the file: llama.cpp's 50, 30 and 4096.
    keys = {
        "embedding_length": 4608,
        "block_count": 46,
        "feed_forward_length": 36864,
        "attention.head_count": 32,
        "attention.head_count_kv": 16,
        "attention.key_length": 128,
        "vocab_size": 256000,
    }
    write_metadata(tmp_path / "g2.gguf", "gemma2", keys)
    cfg = gguf_import.gguf_config(tmp_path / "g2.gguf")
    assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcap, cfg.final_logit_softcap) == (
        144.0,
        50.0,
        30.0,
    )
    assert (cfg.sliding_window, cfg.global_layer_every, cfg.rope_theta) == (4096, 2, 10_000.0)
    # A Gemma 3 file that states its local RoPE base.
    keys |= {"block_count": 26, "attention.sliding_window": 512, "rope.freq_base_swa": 20_000.0}
    write_metadata(tmp_path / "g3.gguf", "gemma3", keys)
    cfg = gguf_import.gguf_config(tmp_path / "g3.gguf")
    assert (cfg.query_pre_attn_scalar, cfg.rope_local_theta, cfg.attn_logit_softcap) == (
        128.0,
        20_000.0,
        0.0,
    )


MOE_KEYS = {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 64}


@pytest.mark.parametrize(
    "arch,keys,match",
    [
        ("qwen3moe", dict(MOE_KEYS, expert_shared_count=1), "qwen3moe.expert_shared_count=1: "),
        ("qwen3moe", dict(MOE_KEYS, expert_used_count=None), "no 'qwen3moe.expert_used_count'"),
        ("qwen3moe", dict(MOE_KEYS, expert_gating_func=2), "qwen3moe.expert_gating_func=2"),
        ("qwen3", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, "'yarn'"),
        ("qwen3", dict(MOE_KEYS), "reads no experts in a 'qwen3' file"),
        ("gemma3", {}, "no 'gemma3.attention.sliding_window'"),
        ("phi3", {}, "general.architecture is 'phi3'; load_gguf reads 'llama', 'qwen3'"),
    ],
)
def test_family_refusals_name_what_is_missing(tmp_path, arch, keys, match):
    base = {
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "vocab_size": 256,
    }
    keys = {k: v for k, v in (base | keys).items() if v is not None}
    write_metadata(tmp_path / "bad.gguf", arch, keys)
    with pytest.raises(gguf_import.GGUFError, match=re.escape(match)) as error:
        gguf_import.gguf_config(tmp_path / "bad.gguf")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, shared_dir, pre):
    from transformers import AutoTokenizer

    from itune.convert.gguf_tokenizer import _SPLITS

    texts = family_texts(shared_dir)
    vocab = byte_level_vocab(texts, split=_SPLITS[pre])
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "embedding_length": 64, "attention.head_count": 4}.items():
        writer.add_uint32(f"llama.{key}", value)
    add_tokenizer(writer, vocab, "gpt2", pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer, _ = gguf_import.load_gguf_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    strings = FAMILY_STRINGS + texts[:50]
    assert [tokenizer.encode(s) for s in strings] == theirs(
        strings, add_special_tokens=False
    )["input_ids"]
