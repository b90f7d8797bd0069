"""The tf.data pipeline: determinism, exact resume position, global batches, tokenizer choice."""

import itertools
import json
import logging

import numpy as np
import pytest

from itune import sharding
from itune.data import encode, held_out, mixture, pipeline, sources, synthetic_tasks
from itune.data import spec as data_spec
from itune.data import vocabulary
from itune.training import feed


def _config(**data_overrides):
    from configs import smoke  # noqa: PLC0415  (configs/ is importable from the repo root)

    config = smoke.get_config("runlocal")
    with config.unlocked():
        for key, value in data_overrides.items():
            node = config.data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def _batches(config, spec, start_step, n):
    ds, stats = pipeline.train_dataset(config.data, spec, start_step)
    return list(itertools.islice(ds.as_numpy_iterator(), n)), stats


def test_stream_is_deterministic_and_resume_starts_at_the_right_batch(tmp_path):
    config = _config()
    spec = data_spec.make_spec(config.data, str(tmp_path))
    first, stats = _batches(config, spec, 0, 5)
    again, _ = _batches(config, spec, 0, 5)
    resumed, _ = _batches(config, spec, 3, 2)
    for a, b in zip(first, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for a, b in zip(first[3:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    batch = first[0]
    assert batch["inputs"].shape == (config.data.global_batch_size, config.data.seq_len)
    assert batch["loss_mask"].sum() > 0 and stats.packed > 0
    # Every trained target is a real token, never padding.
    assert np.all(batch["segment_ids"][batch["loss_mask"] == 1] > 0)


def test_rows_hold_whole_rendered_examples(tmp_path):
    """The first segment of the first row is example 0 of the stream, tokenized."""
    config = _config()
    spec = data_spec.make_spec(config.data, str(tmp_path))
    (batch,), _ = _batches(config, spec, 0, 1)
    example = encode.encode_example(mixture.builtin_example(config.data, 0, "train"), spec)
    n = len(example["inputs"])
    rows = batch["segment_ids"]
    row = int(
        np.argmax(
            [
                (r == 1).sum() == n and np.array_equal(b[:n], example["inputs"])
                for r, b in zip(rows, batch["inputs"])
            ]
        )
    )
    np.testing.assert_array_equal(batch["inputs"][row, :n], example["inputs"])
    np.testing.assert_array_equal(batch["loss_mask"][row, :n], example["loss_mask"])
    trained = batch["targets"][row, :n][batch["loss_mask"][row, :n] == 1]
    answer = synthetic_tasks.make_example(
        config.data.seed, 0, "train", system_prompt_rate=config.data.builtin.system_prompt_rate
    )["answer"]
    assert spec.tokenizer.decode(trained[:-1]).strip() == answer
    assert trained[-1] == spec.stop_id


def test_global_batch_is_sharded_along_the_batch_axes(tmp_path):
    config = _config()
    spec = data_spec.make_spec(config.data, str(tmp_path))
    (local,), _ = _batches(config, spec, 0, 1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    batch = feed.global_batch(local, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES))
    inputs = batch["inputs"]
    assert inputs.shape == local["inputs"].shape and len(inputs.addressable_shards) == 8
    assert inputs.addressable_shards[0].data.shape == (
        local["inputs"].shape[0] // 8,
        config.data.seq_len,
    )
    np.testing.assert_array_equal(np.asarray(inputs), local["inputs"])


def test_eval_batches_cover_every_example_once(tmp_path):
    config = _config()
    spec = data_spec.make_spec(config.data, str(tmp_path))
    batches, stats = held_out.eval_batches(config.data, spec, 20)
    assert list(batches) == ["builtin"] and stats.packed == 20
    segments = sum(
        int(len(set(row[row > 0].tolist()))) for b in batches["builtin"] for row in b["segment_ids"]
    )
    assert segments == 20


def test_an_existing_sentencepiece_model_can_be_used(tmp_path, shared_dir):
    path = str(shared_dir / "tokenizers/unigram_32768.model")
    config = _config(**{"tokenizer.path": path})
    spec = data_spec.make_spec(config.data, str(tmp_path))
    assert spec.tokenizer.vocab_size == 32768 and not (tmp_path / "tokenizer").exists()
    (batch,), _ = _batches(config, spec, 0, 1)
    assert batch["inputs"].max() < 32768 and batch["loss_mask"].sum() > 0


def test_a_missing_tokenizer_file_is_named(tmp_path):
    config = _config(**{"tokenizer.path": str(tmp_path / "nope.model")})
    with pytest.raises(FileNotFoundError, match="nope.model"):
        data_spec.make_spec(config.data, str(tmp_path))


def _file_config(tmp_path, shared_dir, **data):
    config = _config(**data)
    with config.unlocked():
        config.data.sources = {
            "gsm8k": {
                "path": str(shared_dir / "data/gsm8k/train.jsonl"),
                "format": "alpaca",
                "field_map": {"instruction": "question", "output": "answer"},
                "weight": 1.0,
            },
            "chats": {
                "path": str(shared_dir / "data/fastchat/dummy_conversation.json"),
                "weight": 3.0,
            },
        }
        config.data.seq_len = 512
        config.data.eval_examples_per_source = 10
        config.data.tokenizer.vocab_size = 1024
    return config


def test_file_sources_mix_by_weight_and_hold_out_an_eval_slice(tmp_path, shared_dir):
    config = _file_config(tmp_path, shared_dir)
    spec = data_spec.make_spec(config.data, str(tmp_path))
    by_name = {s.name: s for s in spec.sources}
    assert set(by_name) == {"gsm8k", "chats"}
    gsm8k = by_name["gsm8k"]
    assert len(gsm8k) == 7473 - 10 and len(gsm8k.eval) == 10 and len(by_name["chats"]) == 490
    assert not {ex["origin"] for ex in gsm8k.pool(0)} & {ex["origin"] for ex in gsm8k.eval}
    chats = [
        ex for ex, _ in itertools.islice(mixture.train_stream(config.data, spec.sources), 2000)
    ]
    share = sum(ex["source"] == "chats" for ex in chats) / len(chats)
    assert 0.70 < share < 0.80  # Weights 1 : 3.
    # Batches are deterministic and count examples per source.
    (batch,), stats = _batches(config, spec, 0, 1)
    (again,), _ = _batches(config, spec, 0, 1)
    np.testing.assert_array_equal(batch["inputs"], again["inputs"])
    assert set(stats.sources) == {"gsm8k", "chats"} and batch["loss_mask"].sum() > 0
    evals, _ = held_out.eval_batches(config.data, spec, 64)
    assert set(evals) == {"gsm8k", "chats"}


def test_examples_proportional_and_temperature_rates(tmp_path, shared_dir):
    config = _file_config(tmp_path, shared_dir)
    spec = data_spec.make_spec(config.data, str(tmp_path))
    sizes = np.array([len(s) for s in spec.sources], float)
    with config.unlocked():
        config.data.mixture = "examples"
        np.testing.assert_allclose(
            mixture.mixture_rates(config.data, spec.sources), sizes / sizes.sum()
        )
        config.data.mixture_cap = 490
        np.testing.assert_allclose(
            mixture.mixture_rates(config.data, spec.sources), [490 / (490 + 490), 490 / 980]
        )
        config.data.mixture = "temperature"
        config.data.mixture_temperature = 2.0
        rates = np.sqrt(sizes) / np.sqrt(sizes).sum()
        np.testing.assert_allclose(mixture.mixture_rates(config.data, spec.sources), rates)


def test_a_bad_chat_is_an_error_or_a_counted_skip(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "hi", "output": "yo"}\n'
        '{"instruction": "hi", "output": 5}\n'
        '{"instruction": "again", "output": "ok"}\n'
    )
    config = _config()
    with config.unlocked():
        config.data.sources = {"tiny": {"path": str(bad)}}
        config.data.eval_examples_per_source = 0
        config.data.tokenizer.vocab_size = 1024
    with pytest.raises(sources.DataError, match="bad.jsonl:2: field 'output'"):
        data_spec.make_spec(config.data, str(tmp_path))
    with config.unlocked():
        config.data.on_bad_example = "skip"
    spec = data_spec.make_spec(config.data, str(tmp_path))
    assert len(spec.sources[0]) == 2 and spec.sources[0].stats.skipped == {"wrong type": 1}


def test_set_up_tells_of_each_skipped_record_and_of_the_vocabulary_once(tmp_path, caplog):
    """As training sets up: the tokenizer first (a vocabulary trained on the data), then the
    data; the log gives the size of the vocabulary trained, not the bound."""
    path = tmp_path / "data.jsonl"
    records = [{"instruction": f"q{i}", "output": f"a{i}" if i % 10 else 7} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _config()
    with config.unlocked():
        config.data.sources = {"mine": {"path": str(path)}}
        config.data.on_bad_example = "skip"
        config.data.tokenizer.vocab_size = 1024
    with caplog.at_level(logging.INFO):
        tokenizer = vocabulary.load_tokenizer(config.data, str(tmp_path))
        spec = data_spec.make_spec(config.data, str(tmp_path), tokenizer)
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if f"skipped {path}:11:" in m]) == 1
    assert len([m for m in messages if m.startswith("Skipped bad examples in mine")]) == 1
    assert spec.sources[0].stats.skipped == {"wrong type": 4}
    assert tokenizer.vocab_size < 1024
    assert (
        f"Trained a SentencePiece vocabulary of {tokenizer.vocab_size} pieces, all this corpus "
        "supports (data.tokenizer.vocab_size=1024 is a bound)"
    ) in messages


def test_a_hugging_face_tokenizer_directory_can_be_used(tmp_path, shared_dir):
    config = _config(**{"tokenizer.path": str(shared_dir / "tokenizers/smollm2_bpe")})
    spec = data_spec.make_spec(config.data, str(tmp_path))
    assert spec.tokenizer.vocab_size == 49152 and spec.stop_id == 2  # <|im_end|>
    example = encode.encode_example(mixture.builtin_example(config.data, 0, "train"), spec)
    # SmolLM2 adds no BOS of its own: the chat starts with <|im_start|> once.
    assert example["inputs"][0] == 1 and example["inputs"][1] != 1
    trained = example["targets"][example["loss_mask"] == 1]
    assert trained[-1] == 2


def test_a_prepared_tfds_dataset_is_a_source(tmp_path, shared_dir):
    data_dir = str(tmp_path / "tfds")
    sources.prepare_jsonl_dataset(
        "ident", {"train": [str(shared_dir / "data/llamafactory/identity.json")]}, data_dir
    )
    config = _config()
    with config.unlocked():
        config.data.sources = {"ident": {"tfds": "itune_chat/ident:1.0.0", "data_dir": data_dir}}
        config.data.eval_examples_per_source = 11
        config.data.tokenizer.vocab_size = 1024
    spec = data_spec.make_spec(config.data, str(tmp_path))
    assert [s.name for s in spec.sources] == ["ident"] and len(spec.sources[0]) == 80
    (batch,), _ = _batches(config, spec, 0, 1)
    assert batch["loss_mask"].sum() > 0


def test_a_source_with_a_template_bank_is_rephrased(tmp_path, shared_dir):
    from itune.data import templates

    config = _file_config(tmp_path, shared_dir)
    with config.unlocked():
        config.data.sources.gsm8k.templates = {
            "templates": list(templates.GSM8K_BANK.templates),
            "few_shot": 1,
            "few_shot_rate": 0.5,
        }
    spec = data_spec.make_spec(config.data, str(tmp_path))
    stream = mixture.train_stream(config.data, spec.sources)
    gsm8k = [ex for ex, _ in itertools.islice(stream, 400) if ex["source"] == "gsm8k"]
    assert {ex["template"] for ex in gsm8k} == set(range(len(templates.GSM8K_BANK.templates)))
    assert {ex["few_shot"] for ex in gsm8k} == {0, 1}
    for ex in gsm8k:
        question = ex["messages"][-2]["content"]
        assert "####" in ex["messages"][-1]["content"]
        assert (question.count("####") == 1) == (ex["few_shot"] == 1)
    evals = held_out.eval_chats(config.data, spec, 10)["gsm8k"]
    assert all("template" in ex for ex in evals)


def test_mistral_format_with_the_shared_bpe_sentencepiece_model(tmp_path, shared_dir):
    """BOS once, each answer trained with the EOS that ends it, as the tokenizer encodes it."""
    config = _config(
        **{"tokenizer.path": str(shared_dir / "tokenizers/bpe_32000_mistral_v1.model")}
    )
    with config.unlocked():
        config.data.chat_format = "mistral"
    spec = data_spec.make_spec(config.data, str(tmp_path))
    tok = spec.tokenizer
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ex = encode.encode_example({"messages": messages}, spec)
    ids = np.concatenate([ex["inputs"][:1], ex["targets"]])
    assert ids[0] == tok.bos_id and (ids == tok.bos_id).sum() == 1
    trained = ex["targets"][ex["loss_mask"] == 1].tolist()
    first, second = (
        trained[: trained.index(tok.eos_id) + 1],
        trained[trained.index(tok.eos_id) + 1 :],
    )
    assert tok.decode(first[:-1]) == "It is 4." and tok.decode(second[:-1]) == "6"
    assert second[-1] == tok.eos_id
    # In context the answer follows "[/INST]" with no space: the same ids as the full text's.
    full = tok.encode("[INST] What is 2+2? [/INST]It is 4.")
    assert first[:-1] == full[-len(first) + 1 :]


def test_data_shards_own_contiguous_blocks_of_records(tmp_path, shared_dir):
    config = _file_config(tmp_path, shared_dir, shards=4)
    every = mixture.load_sources(config.data, (4, range(0, 4)))
    # What two processes would read before they exchange eval slices and shard sizes.
    halves = [mixture.load_sources(config.data, (4, range(2 * p, 2 * p + 2))) for p in (0, 1)]
    for whole, *parts in zip(every, *halves):
        assert len(whole.eval) == 10
        assert sorted(map(str, whole.eval)) == sorted(map(str, parts[0].eval + parts[1].eval))
        assert len(whole) == len(parts[0]) + len(parts[1]) == sum(map(len, whole.shards.values()))
        assert whole.stats.read == sum(p.stats.read for p in parts)
        origins = [[e["origin"] for e in whole.pool(s)] for s in range(4)]
        assert origins[:2] == [[e["origin"] for e in parts[0].pool(s)] for s in (0, 1)]
        assert origins[2:] == [[e["origin"] for e in parts[1].pool(s)] for s in (2, 3)]
        held_out = {e["origin"] for e in whole.eval}
        assert not held_out & {o for block in origins for o in block}
        with pytest.raises(ValueError, match="does not read shard 3"):
            parts[0].pool(3)
    # Shards take their examples only from their own block.
    gsm8k = next(s for s in every if s.name == "gsm8k")
    for shard in range(4):
        stream = mixture.train_stream(config.data, every, shard, 4)
        seen = {ex["origin"] for ex, _ in itertools.islice(stream, 200) if ex["source"] == "gsm8k"}
        assert seen and seen <= {e["origin"] for e in gsm8k.pool(shard)}


def test_a_shard_without_training_examples_is_an_error(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    config = _config(sources={"tiny": {"path": str(path)}}, eval_examples_per_source=0)
    with pytest.raises(ValueError, match=r"data.sources.tiny .*tiny.jsonl.* data shard\(s\) \[0\]"):
        mixture.load_sources(config.data, (4, range(4)))
    assert len(mixture.load_sources(config.data, (2, range(2)))[0]) == 3
