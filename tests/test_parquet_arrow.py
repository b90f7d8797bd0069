"""Parquet shards and Arrow datasets saved by ``datasets`` as sources: the same records, formats,
field maps, errors, mixtures and exact resume as JSONL."""

import json
import os
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from itune.data import mixture, synthetic_tasks
from itune.data import sources as sources_lib
from itune.data.sources import DataError, SourceSpec, SourceStats, read_source
from itune.errors import ConfigError
from tests.conftest import HANG_GUARD_S, REPO

datasets.disable_progress_bars()


def _alpaca(n, seed=0):
    """Alpaca records of the built-in tasks; ``input`` is null in every other one."""
    records = []
    for i in range(n):
        user, answer = synthetic_tasks.make_example(seed, i, "train")["messages"][-2:]
        records.append(
            {
                "instruction": user["content"],
                "input": None if i % 2 else "",
                "output": answer["content"],
            }
        )
    return records


def _sharegpt(n, seed=1):
    """ShareGPT records under other field names, to be read through a field map."""
    rows = []
    for i in range(n):
        messages = synthetic_tasks.make_example(seed, i, "train")["messages"]
        turns = [{"speaker": m["role"], "text": m["content"]} for m in messages]
        rows.append({"dialogue": turns, "id": i})
    return rows


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _write_parquet_shards(folder, records, shards, row_group_size=7):
    """``records`` as a hub publishes a split: ``train-0000k-of-0000n.parquet``."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [k * len(records) // shards for k in range(shards + 1)]
    for k in range(shards):
        table = pa.Table.from_pylist(records[bounds[k] : bounds[k + 1]])
        name = folder / f"train-{k:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, name, row_group_size=row_group_size)
    return str(folder / "train-*.parquet")


def _save_to_disk(folder, rows, num_shards=2):
    datasets.Dataset.from_list(rows).save_to_disk(str(folder), num_shards=num_shards)
    return str(folder)


def _contents(examples):
    return [[(m["role"], m["content"]) for m in e["messages"]] for e in examples]


def test_parquet_shards_read_as_the_same_records_in_jsonl(tmp_path):
    records = _alpaca(50)
    jsonl = SourceSpec("a", _write_jsonl(tmp_path / "a.jsonl", records))
    glob = _write_parquet_shards(tmp_path / "data", records, 3)
    files = sorted(os.listdir(tmp_path / "data"))
    assert files[1] == "train-00001-of-00003.parquet"
    for path in (glob, str(tmp_path / "data")):  # A glob of the shards, or their folder.
        spec = SourceSpec("a", path, format="alpaca")
        assert sources_lib.count_records(spec) == 50
        stats = SourceStats()
        examples = list(read_source(spec, stats=stats))
        assert _contents(examples) == _contents(read_source(jsonl))
        assert (stats.read, stats.yielded, stats.format) == (50, 50, "alpaca")
        # Origins name the shard and the row in it; the second shard starts at record 16.
        second = str(tmp_path / "data" / files[1])
        assert examples[16]["origin"] == f"{second}:row 0"
        assert examples[20]["origin"] == f"{second}:row 4"
    # A range across shards and row groups reads only its records, in order, by index.
    spec = SourceSpec("a", glob)
    got = list(sources_lib.read_records(spec, first=13, stop=40))
    assert [i for i, _ in got] == list(range(13, 40))
    assert _contents(e for _, e in got) == _contents(list(read_source(jsonl))[13:40])
    table = sources_lib.record_table(spec, 13, 40)
    assert (
        len(table) == 27
        and table.raw(33).record == pa.Table.from_pylist(records).slice(33, 1).to_pylist()[0]
    )


def test_an_arrow_dataset_saved_by_datasets_reads_through_a_field_map(tmp_path):
    rows = _sharegpt(30)
    folder = _save_to_disk(tmp_path / "chats", rows, num_shards=3)
    assert len([n for n in os.listdir(folder) if n.endswith(".arrow")]) == 3
    spec = SourceSpec(
        "chats",
        folder,
        format="sharegpt",
        field_map={"conversations": "dialogue", "from": "speaker", "value": "text"},
    )
    assert sources_lib.count_records(spec) == 30
    examples = list(read_source(spec))
    expected = [[(t["speaker"], t["text"]) for t in r["dialogue"]] for r in rows]
    assert _contents(examples) == expected
    # Origins give the row as ``dataset[i]`` does, across the dataset's data files.
    assert [e["origin"] for e in examples[9:12]] == [f"{folder}:row {i}" for i in (9, 10, 11)]
    assert [i for i, _ in sources_lib.read_records(spec, first=8, stop=23)] == list(range(8, 23))
    assert sources_lib.record_table(spec, 8, 23).raw(21).record == rows[21]
    # ``auto`` reads the format off the first record, as for JSONL.
    auto = _save_to_disk(tmp_path / "auto", [{"messages": r["dialogue"]} for r in rows][:4], 1)
    stats = SourceStats()
    spec = SourceSpec("auto", auto, field_map={"role": "speaker", "content": "text"})
    assert len(list(read_source(spec, stats=stats))) == 4 and stats.format == "messages"


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_bad_rows_name_the_file_the_row_and_the_field(tmp_path, mode):
    records = _alpaca(12)
    records[5]["output"] = None  # A null answer in the second shard, its row 1.
    glob = _write_parquet_shards(tmp_path / "data", records, 3)
    second = tmp_path / "data" / "train-00001-of-00003.parquet"
    rows = _sharegpt(6)
    rows[4]["dialogue"][0]["speaker"] = "narrator"
    folder = _save_to_disk(tmp_path / "chats", rows)
    chat_fields = {"conversations": "dialogue", "from": "speaker", "value": "text"}
    cases = [
        (
            SourceSpec("a", glob, format="alpaca"),
            f"{second}:row 1: field 'output': expected a string, got null",
            "wrong type",
        ),
        (
            SourceSpec("c", folder, format="sharegpt", field_map=chat_fields),
            f"{folder}:row 4: field 'dialogue.0.speaker': unknown role 'narrator'",
            "unknown role",
        ),
    ]
    for spec, message, reason in cases:
        stats = SourceStats()
        if mode == "error":
            with pytest.raises(DataError) as info:
                list(read_source(spec, stats=stats))
            assert str(info.value).startswith(message) and "\n" not in str(info.value)
        else:
            examples = list(read_source(spec, "skip", stats))
            assert len(examples) == stats.read - 1 and stats.skipped == {reason: 1}


def test_folders_that_are_not_one_dataset_are_named(tmp_path):
    rows = _sharegpt(4)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(
        DataError, match=r"is a DatasetDict of splits \['train', 'test'\]; .*/train"
    ):
        sources_lib.count_records(SourceSpec("d", str(tmp_path / "dict")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds neither Parquet files nor a dataset"):
        sources_lib.count_records(SourceSpec("e", str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="no such file"):
        sources_lib.count_records(SourceSpec("g", str(tmp_path / "data" / "train-*.parquet")))


def _mixture_sources(root):
    """A JSONL source, Parquet shards and an Arrow dataset, as ``data.sources`` entries."""
    root.mkdir(exist_ok=True)
    chats = [
        {"messages": synthetic_tasks.make_example(2, i, "train")["messages"]} for i in range(90)
    ]
    return {
        "alpaca": {"path": _write_jsonl(root / "alpaca.jsonl", _alpaca(120))},
        "parquet": {"path": _write_parquet_shards(root / "hub" / "data", chats, 3), "weight": 2.0},
        "arrow": {
            "path": _save_to_disk(root / "saved", _sharegpt(80)),
            "format": "sharegpt",
            "field_map": {"conversations": "dialogue", "from": "speaker", "value": "text"},
        },
    }


def test_parquet_and_arrow_pools_hold_indices_and_match_the_records(tmp_path):
    from configs import smoke  # noqa: PLC0415  (configs/ is importable from the repo root)

    config = smoke.get_config("runlocal")
    with config.unlocked():
        config.data.sources = _mixture_sources(tmp_path)
        config.data.eval_examples_per_source = 5
    halves = [mixture.load_sources(config.data, (2, range(p, p + 1))) for p in (0, 1)]
    for name, entry in config.data.sources.items():
        every = list(read_source(sources_lib.spec_from_config(entry, name)))
        parts = [next(s for s in loaded if s.name == name) for loaded in halves]
        pools = [source.pool(p) for p, source in enumerate(parts)]
        assert all(isinstance(pool, sources_lib.RecordPool) for pool in pools)
        # Each process read, and holds, only the rows of its own block.
        assert [len(pool.table) for pool in pools] == [
            len(every) // 2,
            len(every) - len(every) // 2,
        ]
        assert [p.stats.read for p in parts] == [len(pool.table) for pool in pools]
        # Each half's pool is its block of records, in order, less its part of the eval slice.
        held_out = {e["origin"] for e in parts[0].eval + parts[1].eval}
        assert len(held_out) == 5
        assert list(pools[0]) + list(pools[1]) == [e for e in every if e["origin"] not in held_out]


_SCRIPT = """
import hashlib, json, sys, threading
from configs import smoke
from itune import runtime
from itune.data import pipeline
from itune.data import spec as data_spec
from itune.training import feed
workdir, mode, n, k = sys.argv[1:5]
config = smoke.get_config("runlocal")
with config.unlocked():
    config.data.sources = json.load(open(workdir + "/sources.json"))
    config.data.shards = 2
    config.data.seq_len = 128
    config.data.tokenizer.vocab_size = 512
spec = data_spec.make_spec(config.data, workdir)
state = json.load(open(workdir + "/state.json"))[0] if mode == "resume" else None
states = pipeline.RowStates(1000)
stop = threading.Event()
ds, stats = pipeline.train_dataset(config.data, spec, state=state, states=states, stop=stop)
batches = feed.BatchIterator(ds, stop=stop)
for step in range(int(n)):
    batch = next(batches)
    last_row = int(batch.pop(pipeline.ROW_ID)[-1])
    digest = hashlib.sha256(b"".join(batch[key].tobytes() for key in sorted(batch))).hexdigest()
    print("BATCH", digest, sorted(set(batch["source_ids"].ravel().tolist())))
    if mode == "first" and step + 1 == int(k):
        json.dump(runtime.gather_json(states.after(last_row)), open(workdir + "/state.json", "w"))
batches.close()
"""


def _run(workdir, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(workdir), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line.split(maxsplit=1)[1] for line in result.stdout.splitlines() if "BATCH" in line]


def test_parquet_and_arrow_sources_in_a_mixture_resume_exactly_in_a_new_process(tmp_path):
    (tmp_path / "sources.json").write_text(json.dumps(_mixture_sources(tmp_path / "data")))
    uninterrupted = _run(tmp_path, "first", 6, 2)
    resumed = _run(tmp_path, "resume", 4, 0)
    assert len(set(uninterrupted)) == 6
    assert resumed == uninterrupted[2:]
    state = json.loads((tmp_path / "state.json").read_text())[0]
    # Both data shards took examples from each of the three sources before the cut.
    assert all(min(s["stream"]["counts"]) > 0 for s in state["shards"].values())
