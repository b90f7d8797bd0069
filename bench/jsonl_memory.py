"""Peak memory of reading a large JSONL source: its records are read by line offset, checked once
and read again when the stream takes them, so a process holds 8 bytes of offset a training
example, not the example.

  PYTHONPATH=. python bench/jsonl_memory.py                        # a 1.5 GB file
  PYTHONPATH=. python bench/jsonl_memory.py --gigabytes=0.2 --before=/tmp/before

Writes a JSONL file of Alpaca records of about 4 KB each (or reads ``--path``), then, in a fresh
process per checkout (``--before``: another checkout to compare, e.g. ``git archive REV | tar -x
-C /tmp/before``), reads it as the one source of one process (`itune.data.mixture.load_sources`)
and takes ``--examples`` examples of its training stream. Prints, per checkout, the peak resident
memory (``VmHWM``) after the imports and at the end, the time to read the source and the stream's
examples per second.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

_CHILD = """
import itertools, sys, time
from itune import configlib
from itune.data import mixture

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM"))

c = configlib.base_config()
c.data.sources = {"big": {"path": sys.argv[1], "format": "alpaca"}}
before = peak_mb()
start = time.perf_counter()
sources = mixture.load_sources(c.data)
loaded = time.perf_counter()
for example, _ in itertools.islice(mixture.train_stream(c.data, sources), int(sys.argv[2])):
    pass
streamed = time.perf_counter()
print("RESULT", before, peak_mb(), len(sources[0]), loaded - start,
      int(sys.argv[2]) / (streamed - loaded))
"""


def write_records(path: pathlib.Path, gigabytes: float) -> int:
    answer = " ".join(f"word{i % 97}" for i in range(500))
    n = int(gigabytes * 2**30) // (len(answer) + 60)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Question {i}?", "output": f"{i} {answer}"}) + "\n")
    return n


def measure(checkout: str, path: str, examples: int) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, path, str(examples)],
        env=env,
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    before, peak, size, load_s, rate = out.split("RESULT")[1].split()
    return {
        "after imports (MB)": int(before),
        "peak (MB)": int(peak),
        "growth (MB)": int(peak) - int(before),
        "training examples": int(size),
        "read (s)": round(float(load_s), 1),
        "stream (examples/s)": round(float(rate)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.5)
    parser.add_argument("--path", help="an existing JSONL file of Alpaca records instead")
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--before", help="another checkout to measure the same way")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if not path:
            path = str(pathlib.Path(tmp) / "big.jsonl")
            n = write_records(pathlib.Path(path), args.gigabytes)
            print(f"wrote {path}: {os.path.getsize(path) / 2**30:.2f} GiB, {n} records")
        checkouts = {"this checkout": os.getcwd()}
        if args.before:
            checkouts = {"before": args.before, **checkouts}
        for name, checkout in checkouts.items():
            print(name, measure(checkout, path, args.examples), flush=True)


if __name__ == "__main__":
    main()
