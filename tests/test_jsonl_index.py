"""JSONL sources by line offset: a process decodes only the records of its data shards, each when
the stream uses it, and a large file costs memory for its offsets, not for its records."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest

from itune.data import mixture
from itune.data.sources import jsonl
from itune.data.sources.jsonl import Lines, line_offsets
from tests.conftest import HANG_GUARD_S, REPO


def _config(path, **data):
    from configs import smoke  # noqa: PLC0415  (configs/ is importable from the repo root)

    config = smoke.get_config("runlocal")
    with config.unlocked():
        config.data.sources = {"qa": {"path": str(path), "format": "prompt_completion"}}
        for key, value in data.items():
            config.data[key] = value
    return config


def test_line_offsets_and_lines_of_every_range(tmp_path):
    lines = ['{"p": 1}', "", "  ", '{"p": "ü"}', '{"p": 3}']
    for ending in ("", "\n", "\n\n"):
        path = tmp_path / "x.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + ending.encode())
        data = path.read_bytes()
        num_lines = jsonl.count(type("Spec", (), {"path": str(path)}))
        assert num_lines == len(lines) + (ending == "\n\n")
        starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n") and i + 1 < len(data)]
        for first in range(num_lines + 1):
            for stop in [*range(first, num_lines + 2), None]:
                end = num_lines if stop is None else min(stop, num_lines)
                expected = starts[first:end] + [(starts + [len(data)])[max(end, first)]]
                assert line_offsets(str(path), first, stop).tolist() == expected, (first, stop)
        table = Lines(str(path), 1, None)
        in_order = {raw.index: raw.record for raw in table.records()}
        assert in_order == {3: {"p": "ü"}, 4: {"p": 3}}  # Blank lines are records of nothing.
        assert {i: table.raw(i).record for i in in_order} == in_order
        assert table.raw(1) is None and Lines(str(path)).raw(0).record == {"p": 1}  # BOM gone.


def test_a_process_decodes_only_the_records_of_its_shards(tmp_path, monkeypatch):
    """Two processes of two data shards each, simulated in turn: every JSON decode of each is of
    a line in its own block, its first reading decodes that block once, and the stream decodes a
    record each time it takes one (the examples are not held)."""
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(400))
    )
    config = _config(path, shards=4, eval_examples_per_source=8)
    decoded = []
    decode = jsonl._json_record

    def counting(text, origin):
        decoded.append(int(origin.rsplit(":", 1)[1]) - 1)  # The 0-based line.
        return decode(text, origin)

    monkeypatch.setattr(jsonl, "_json_record", counting)
    for process in (0, 1):
        own = range(2 * process, 2 * process + 2)
        block = range(200 * process, 200 * process + 200)  # Shards own 100 lines each.
        decoded.clear()
        sources = mixture.load_sources(config.data, (4, own))
        assert sorted(decoded) == list(block)
        assert len(sources[0].pool(own[0])) + len(sources[0].pool(own[1])) + len(
            sources[0].eval
        ) == len(block)
        for shard in own:
            decoded.clear()
            taken = [
                ex
                for ex, _ in itertools.islice(
                    mixture.train_stream(config.data, sources, shard, 4), 250
                )
            ]
            lines = {int(ex["origin"].rsplit(":", 1)[1]) - 1 for ex in taken}
            assert len(decoded) == 250 and set(decoded) == lines  # Each take decodes one record.
            assert lines <= set(range(100 * shard, 100 * shard + 100))
            assert [ex["messages"][0]["content"] for ex in taken[:3]] == [
                f"q{line}" for line in decoded[:3]
            ]


_CHILD = textwrap.dedent(
    """
    import itertools, sys
    from itune import configlib
    from itune.data import mixture

    def peak_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM"))

    c = configlib.base_config()
    c.data.sources = {"big": {"path": sys.argv[1], "format": "alpaca"}}
    c.data.eval_examples_per_source = 16
    before = peak_mb()
    sources = mixture.load_sources(c.data)
    for example, _ in itertools.islice(mixture.train_stream(c.data, sources), 3000):
        assert example["messages"][-1]["content"]
    print("PEAK", before, peak_mb(), len(sources[0]))
    """
)


@pytest.mark.parametrize("megabytes", [200])
def test_memory_of_a_large_jsonl_source_is_its_offsets_not_its_records(tmp_path, megabytes):
    """Reading a 200 MB JSONL source and streaming from it raises the peak resident memory by
    far less than the file's size (held as examples, the records alone took more than the file)."""
    path = tmp_path / "big.jsonl"
    answer = " ".join(f"word{i % 97}" for i in range(500))  # About 4 KB a record.
    num_records = megabytes * 2**20 // (len(answer) + 60)
    with open(path, "w") as f:
        for i in range(num_records):
            f.write(json.dumps({"instruction": f"Question {i}?", "output": f"{i} {answer}"}) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, peak, size = map(int, result.stdout.split("PEAK")[1].split())
    assert size == num_records - 16
    assert peak - before < megabytes // 4, (before, peak)
