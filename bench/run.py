"""Every benchmark of the project, one after the other, summarised in one table.

  PYTHONPATH=. python bench/run.py            # each benchmark's full run (about 35 minutes)
  PYTHONPATH=. python bench/run.py --quick    # under 10 minutes on a 2-core CPU

Runs `bench/pipeline.py` (packing efficiency on real data, pipeline throughput against the
train step's consumption), `bench/train_step.py` (MFU, and throughput against Hugging Face +
PyTorch), `bench/decode.py` (decode throughput against transformers ``generate``) and
`bench/moe.py` (a mixture-of-experts train step against transformers + PyTorch, grouped expert
products against the dense loop), each in its own process with its own output shown as it goes,
then prints the figures that matter from all of them in one table. ``--quick`` uses each
benchmark's short settings: fewer rounds and smaller batches, figures for a smoke check rather
than for quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import report

HERE = os.path.dirname(os.path.abspath(__file__))

# (script, its arguments in full, in --quick)
BENCHMARKS = (
    ("pipeline.py", [], ["--rounds", "2", "--batches", "10", "--steps", "4",
                         "--stage-batches", "3", "--pack-examples", "3000"]),
    ("train_step.py", [], ["--quick"]),
    ("decode.py", [], ["--quick"]),
    ("moe.py", [], ["--quick"]),
)  # fmt: skip
# The columns of each table that go into the summary.
SUMMARY_COLUMNS = {
    "packing": ("non-padding (stream)",),
    "throughput": ("pipeline / consumption",),
    "train step": ("s/step", "MFU (same-dtype peak)", "itune / PyTorch throughput"),
    "decode": ("itune decode tokens/s", "transformers decode tokens/s",
               "decode itune / transformers"),
    "moe step": ("ms/step", "itune / fastest PyTorch throughput"),
    "moe layer": ("speed-up over dense",),
}  # fmt: skip
# Leading cells that name a row.
LABEL_CELLS = {"packing": 2, "moe layer": 3}


def summary_rows(tables: list[dict]) -> list[list[str]]:
    rows = []
    for t in tables:
        columns = SUMMARY_COLUMNS.get(t["title"])
        if not columns:
            continue
        for row in t["rows"]:
            label = ", ".join(str(c) for c in row[: LABEL_CELLS.get(t["title"], 1)])
            for column in columns:
                value = str(row[t["header"].index(column)])
                if value not in ("-", ""):
                    rows.append([t["benchmark"], f"{t['title']}: {label}", column, value])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short settings, under 10 minutes")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), *sys.path]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="itune_bench_") as tmp:
        env["ITUNE_BENCH_TABLES"] = tables_path = os.path.join(tmp, "tables.jsonl")
        durations = []
        for script, full, quick in BENCHMARKS:
            command = [sys.executable, os.path.join(HERE, script), *(quick if args.quick else full)]
            print(f"\n$ {' '.join(command[1:])}", flush=True)
            began = time.perf_counter()
            subprocess.run(command, env=env, check=True)
            durations.append([script, f"{time.perf_counter() - began:.0f} s"])
        with open(tables_path, encoding="utf-8") as f:
            tables = [json.loads(line) for line in f]
    print(f"\n# All benchmarks{' (--quick)' if args.quick else ''}\n")
    report.table("summary", ["benchmark", "table: row", "measure", "figure"], summary_rows(tables))
    durations.append(["total", f"{time.perf_counter() - start:.0f} s"])
    print(report.markdown(["benchmark", "wall time"], durations))


if __name__ == "__main__":
    main()
