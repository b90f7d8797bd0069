"""TFDS sources: local files prepared as itune_chat, read back; any TFDS dataset as a source."""

import json
import socket
import subprocess
import sys
import tempfile
from unittest import mock

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from itune.data import sources
from itune.data.sources import (
    DatasetNotPreparedError,
    DataError,
    SourceSpec,
    SourceStats,
    TfdsSourceSpec,
    prepare_jsonl_dataset,
    read_source,
    read_tfds,
)
from tests.conftest import HANG_GUARD_S, REPO

ALPACA = [
    {"instruction": "Say hi.", "output": "Hi!"},
    {"instruction": "Add.", "input": "2 3", "output": "5", "system": "Be brief."},
    {"instruction": "Übersetze: cat", "output": "Katze", "history": [["Hello", "Hallo"]]},
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "weather"}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
        "tools": '[{"name": "weather"}]',
    },
    {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
]


def _jsonl(path, records, blank_after=None):
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")  # Shifts the lines after it, which origins must follow.
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _json_list(path, records):
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    return str(path)


def _expected(name, paths):
    """The files' records as a prepared dataset stores them: messages of role and content, a
    turn's tool calls written into its content as JSON text."""
    from itune.data import chat

    return [
        {
            **x,
            "messages": [
                {"role": m["role"], "content": chat.calls_as_text(m)["content"]}
                for m in x["messages"]
            ],
        }
        for path in paths
        for x in read_source(SourceSpec(name, path))
    ]


def _from_numpy(record):
    """A record of ``tfds.load`` (bytes, a dict of arrays for messages) as the normal form."""
    messages = record["messages"]
    pairs = zip(messages["role"], messages["content"])
    return {
        "messages": [{"role": r.decode(), "content": c.decode()} for r, c in pairs],
        "source": record["source"].decode(),
        "tools": record["tools"].decode() or None,
        "origin": record["origin"].decode(),
    }


@pytest.fixture
def no_network(monkeypatch):
    """Fails any socket connection or GCS look-up that preparing or loading might try."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    gcs = tfds.core.utils.gcs_utils
    monkeypatch.setattr(gcs, "is_dataset_on_gcs", refuse)
    monkeypatch.setattr(gcs, "download_gcs_dataset", refuse)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``itune_chat/mine``: train from an alpaca JSONL and a sharegpt JSON list, validation."""
    folder = tmp_path_factory.mktemp("files")
    files = {
        "train": [
            _jsonl(folder / "alpaca.jsonl", ALPACA, blank_after=1),
            _json_list(folder / "chats.json", SHAREGPT),
        ],
        "validation": [_jsonl(folder / "dev.jsonl", SHAREGPT[::-1])],
    }
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = prepare_jsonl_dataset("mine", files, str(data_dir))
    return builder, files, str(data_dir)


def test_prepare_then_tfds_load_gives_read_source_examples(prepared, no_network):
    builder, files, data_dir = prepared
    assert builder.info.full_name == "itune_chat/mine/1.0.0"
    assert str(builder.data_path) == f"{data_dir}/itune_chat/mine/1.0.0"
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 5,
        "validation": 2,
    }
    for split, paths in files.items():
        expected = _expected("mine", paths)
        ds = tfds.load(
            "itune_chat/mine:1.0.0", split=split, data_dir=data_dir, download=False, try_gcs=False
        )
        # Order too: the builder writes without shuffling.
        assert [_from_numpy(x) for x in tfds.as_numpy(ds)] == expected
        assert list(read_tfds("itune_chat/mine:1.0.0", split, data_dir)) == expected
    assert expected[1]["origin"].endswith("dev.jsonl:2") and expected[1]["tools"]
    from_dir = tfds.builder_from_directory(builder.data_path).as_dataset(split="validation")
    assert [_from_numpy(x) for x in tfds.as_numpy(from_dir)] == expected


def test_read_tfds_slices_renames_and_counts(prepared):
    _, files, data_dir = prepared
    stats = SourceStats()
    got = list(read_tfds("itune_chat/mine", "train[1:3]", data_dir, source="renamed", stats=stats))
    expected = _expected("mine", files["train"])[1:3]
    assert got == [{**x, "source": "renamed"} for x in expected]
    assert (stats.name, stats.read, stats.yielded) == ("renamed", 2, 2)
    assert expected[1]["origin"].endswith("alpaca.jsonl:4")  # Past the blank line.


def test_a_record_range_of_a_sliced_split_reads_only_its_records(prepared):
    _, files, data_dir = prepared
    every = _expected("mine", files["train"])[1:] + _expected("mine", files["validation"])
    spec = TfdsSourceSpec("mine", "itune_chat/mine", "train[1:]+validation", data_dir)
    assert sources.count_records(spec) == len(every) == 6
    stats = SourceStats()
    got = list(sources.read_records(spec, "error", stats, 2, 5))
    assert got == [(i, {**every[i], "source": "mine"}) for i in (2, 3, 4)]
    assert stats.read == 3
    assert list(sources.read_records(spec, first=6, stop=9)) == []


def test_prepare_reuses_refuses_a_changed_recipe_and_overwrites(prepared, tmp_path):
    builder, files, data_dir = prepared
    again = prepare_jsonl_dataset("mine", files, data_dir)
    assert again.data_path == builder.data_path
    with pytest.raises(ValueError, match="overwrite=True"):
        prepare_jsonl_dataset("mine", {"train": files["train"][:1]}, data_dir)
    other = str(tmp_path / "other")
    prepare_jsonl_dataset("mine", {"train": files["validation"]}, other)
    prepare_jsonl_dataset("mine", {"train": files["train"]}, other, overwrite=True)
    assert list(read_tfds("itune_chat/mine", "train", other)) == _expected("mine", files["train"])


def test_shared_identity_file(shared_dir, tmp_path, no_network):
    path = str(shared_dir / "data/llamafactory/identity.json")
    prepare_jsonl_dataset("identity", {"train": [path]}, str(tmp_path), format="alpaca")
    expected = list(read_source(SourceSpec("identity", path, "alpaca")))
    assert len(expected) == 91
    assert list(read_tfds("itune_chat/identity:1.0.0", "train", str(tmp_path))) == expected
    ds = tfds.load("itune_chat/identity", split="train", data_dir=str(tmp_path), download=False)
    assert [_from_numpy(x) for x in tfds.as_numpy(ds)] == expected


def test_not_prepared_names_the_dataset_and_data_dir(prepared, tmp_path):
    _, _, data_dir = prepared
    with pytest.raises(DatasetNotPreparedError) as caught:
        read_tfds("itune_chat/absent:1.0.0", "train", data_dir)
    message = str(caught.value)
    assert "'itune_chat/absent:1.0.0' is not prepared" in message
    assert data_dir in message and "itune_chat/mine:1.0.0" in message  # What is there instead.
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared.*no prepared dataset"):
        read_tfds("mnist", "train", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown split"):
        list(read_tfds("itune_chat/mine", "test", data_dir))


def test_preparing_and_looking_up_write_nothing_outside_data_dir(tmp_path, monkeypatch):
    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    path = _jsonl(tmp_path / "a.jsonl", ALPACA)
    data_dir = str(tmp_path / "tfds")
    prepare_jsonl_dataset("once", {"train": [path]}, data_dir)
    with pytest.raises(DatasetNotPreparedError):
        read_tfds("itune_chat/absent:1.0.0", "train", data_dir)
    assert list(read_tfds("itune_chat/once", "train", data_dir)) == _expected("once", [path])
    assert list(system_temp.iterdir()) == []


def test_bad_record_raises_the_sources_data_error(tmp_path):
    bad = ALPACA[:2] + [{"instruction": "Count.", "output": 3}]
    path = _jsonl(tmp_path / "bad.jsonl", bad, blank_after=1)
    with pytest.raises(
        DataError, match=r"bad\.jsonl:4: field 'output': expected a string, got int"
    ):
        prepare_jsonl_dataset("bad", {"train": [path]}, str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds/itune_chat/bad/1.0.0").exists()
    with pytest.raises(DatasetNotPreparedError):
        read_tfds("itune_chat/bad:1.0.0", "train", str(tmp_path / "tfds"))


def test_prepare_checks_its_arguments(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", ALPACA)
    with pytest.raises(ValueError, match="dataset name 'a/b'"):
        prepare_jsonl_dataset("a/b", {"train": [path]}, str(tmp_path))
    with pytest.raises(ValueError, match="split 'tr ain'"):
        prepare_jsonl_dataset("a", {"tr ain": [path]}, str(tmp_path))
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        prepare_jsonl_dataset("a", {"train": path}, str(tmp_path), format="csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        prepare_jsonl_dataset("a", {"train": [str(tmp_path / "missing.jsonl")]}, str(tmp_path))
    assert not (tmp_path / "itune_chat").exists()


class QaToy(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Any TFDS dataset: question/answer fields, a nested list of turns, an int, shuffled."""

    VERSION = tfds.core.Version("0.1.0")
    ROWS = [
        ("2+2?", "4", [("user", "hi"), ("bot", "hello")]),
        ("Capital of France?", "Paris", [("user", "and of Spain?"), ("bot", "Madrid")]),
        ("Empty?", "", [("user", "last")]),
    ]

    def _info(self):
        turn = {"speaker": tfds.features.Text(), "text": tfds.features.Text()}
        features = {
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "turns": tfds.features.Sequence(turn),
            "id": tfds.features.Scalar(dtype=np.int64),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (question, answer, turns) in enumerate(self.ROWS):
            turns = [{"speaker": s, "text": t} for s, t in turns]
            yield i, {"question": question, "answer": answer, "turns": turns, "id": i}


@pytest.fixture(scope="module")
def qa_toy(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("qa"))
    # A new builder leaves a folder in the system temp dir; it goes to the test's own instead.
    with mock.patch.object(tempfile, "tempdir", str(tmp_path_factory.mktemp("temp"))):
        QaToy(data_dir=data_dir).download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return data_dir


def _sorted(examples):
    return sorted(examples, key=lambda x: json.dumps(x, sort_keys=True))


def test_read_tfds_any_dataset_with_a_field_map(qa_toy, no_network):
    alpaca = {"instruction": "question", "output": "answer"}
    stats = SourceStats()
    got = list(read_tfds("qa_toy", "train", qa_toy, alpaca, on_bad_example="skip", stats=stats))
    assert stats.read == 3 and stats.skipped == {"empty assistant turn": 1}
    # Written shuffled, so compared as sorted lists; origins are distinct places in the split.
    origins = {x.pop("origin") for x in got}
    assert len(origins) == 2 and origins <= {f"tfds:qa_toy/0.1.0/train#{i}" for i in range(3)}
    pairs = [(q, a) for q, a, _ in QaToy.ROWS[:2]]
    expected = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs
    ]
    assert _sorted(got) == _sorted([{**x, "source": "qa_toy", "tools": None} for x in expected])
    with pytest.raises(DataError, match=r"tfds:qa_toy/0\.1\.0/train#\d: field 'answer': empty"):
        list(read_tfds("qa_toy", "train", qa_toy, alpaca, "alpaca"))

    # The nested turns arrive as a dict of arrays and convert like a sharegpt conversation.
    sharegpt = {"conversations": "turns", "from": "speaker", "value": "text"}
    roles = {"bot": "assistant"}
    got = list(
        read_tfds("qa_toy", "train", qa_toy, sharegpt, role_map=roles, on_bad_example="skip")
    )
    assert len(got) == 2 and all(x["origin"].startswith("tfds:qa_toy/0.1.0/train#") for x in got)
    role = {"user": "user", "bot": "assistant"}
    expected = [[{"role": role[s], "content": t} for s, t in turns] for *_, turns in QaToy.ROWS[:2]]
    assert _sorted(x["messages"] for x in got) == _sorted(expected)


def test_source_entries_from_config(prepared, qa_toy):
    _, files, data_dir = prepared
    entries = ml_collections.ConfigDict(
        {
            "mine": {"tfds": "itune_chat/mine:1.0.0", "split": "validation", "data_dir": data_dir},
            "toy": {
                "tfds": "qa_toy",
                "data_dir": qa_toy,
                "format": "alpaca",
                "field_map": {"instruction": "question", "output": "answer"},
                "weight": 2.0,
            },
            "file": {"path": files["train"][0]},
        }
    )
    specs = {spec.name: spec for spec in sources.specs_from_config(entries)}
    mine, toy, file = specs["mine"], specs["toy"], specs["file"]
    assert mine == TfdsSourceSpec("mine", "itune_chat/mine:1.0.0", "validation", data_dir)
    assert toy.split == "train" and toy.weight == 2.0 and toy.field_map["output"] == "answer"
    assert file == SourceSpec("file", files["train"][0])
    assert list(sources.read_source(mine)) == _expected("mine", files["validation"])
    stats = SourceStats()
    assert len(list(sources.read_source(toy, "skip", stats))) == 2
    assert stats.summary() == "toy: 3 read, 2 yielded, skipped: 1 empty assistant turn"
    assert list(sources.read_source(file)) == _expected("file", files["train"][:1])

    spec = sources.tfds_spec_from_config({"tfds": "itune_chat/mine"}, name="m")
    assert (spec.name, spec.split, spec.data_dir, spec.try_gcs) == ("m", "train", None, False)
    with pytest.raises(ValueError, match=r"unknown keys \['path'\]"):
        sources.tfds_spec_from_config({"name": "m", "tfds": "x", "path": "y"})
    with pytest.raises(ValueError, match="field_map keys"):
        TfdsSourceSpec("m", "x", format="alpaca", field_map={"prompt": "q"})
    with pytest.raises(ValueError, match="weight must be positive"):
        TfdsSourceSpec("m", "x", weight=0)


def test_command_line(tmp_path):
    train = _jsonl(tmp_path / "a.jsonl", ALPACA)
    dev = _json_list(tmp_path / "b.json", SHAREGPT)
    data_dir = str(tmp_path / "tfds")
    splits = [f"--split=train={train},{dev}", f"--split=validation={dev}"]
    done = _prepare("cli", data_dir, *splits, '--field_map={"instruction": "instruction"}')
    assert done.returncode == 0, done.stderr[-3000:]
    assert "itune_chat/cli/1.0.0 in" in done.stdout
    assert sources.prepared_datasets(data_dir) == ["itune_chat/cli:1.0.0"]
    assert list(read_tfds("itune_chat/cli", "train", data_dir)) == _expected("cli", [train, dev])
    # A mistake is told in one line.
    done = _prepare("cli", data_dir, "--split=train")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "itune-prepare: --split=train: expected SPLIT=FILE[,FILE...]; see --help"
    ]


def _prepare(*args):
    command = [sys.executable, "-m", "itune.cli.prepare", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)