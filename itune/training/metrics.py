"""Training metrics: a progress bar, TensorBoard event files and a JSONL log in the workdir."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import tensorflow as tf
import tqdm

from itune import atomic
from itune.errors import UserError
from itune.evaluation import report as eval_report


class Progress:
    """A progress bar with ETA, and per-interval averages of the step metrics, with throughput
    and, given the model's FLOPs per token and the devices' peak, model FLOPs utilisation (MFU).

    Step metrics stay on device between log steps, so logging does not stall the step pipeline.
    """

    def __init__(
        self,
        start_step: int,
        num_steps: int,
        log_every: int,
        flops_per_token: float = 0.0,
        peak_flops: float = 0.0,
    ):
        self.log_every = max(1, log_every)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.enabled = jax.process_index() == 0
        self._bar = tqdm.tqdm(
            total=num_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.enabled,
            mininterval=1.0,
        )
        self._pending: list[dict] = []
        self._tokens = 0
        self._timers: dict[str, float] = {}
        self._last_time = time.perf_counter()

    @contextlib.contextmanager
    def timer(self, name: str):
        start = time.perf_counter()
        yield
        self._timers[name] = self._timers.get(name, 0.0) + time.perf_counter() - start

    def update(self, step: int, step_metrics: dict, tokens: int) -> dict | None:
        """Records one step; every ``log_every`` steps returns the interval's averaged metrics."""
        self._pending.append(step_metrics)
        self._tokens += tokens
        self._bar.update(1)
        if step % self.log_every and step != self._bar.total:
            return None
        values = jax.device_get(self._pending)  # Waits for the interval's steps to finish.
        now = time.perf_counter()
        # Evaluation and checkpointing are not training time.
        paused = sum(self._timers.get(k, 0.0) for k in ("eval", "checkpoint"))
        elapsed, n = now - self._last_time - paused, len(values)
        summary = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        summary["learning_rate"] = float(values[-1]["learning_rate"])
        summary["step_time"] = elapsed / n
        summary["tokens_per_sec"] = self._tokens / elapsed
        summary["data_wait"] = self._timers.get("data_wait", 0.0) / elapsed
        summary["trained_tokens_per_sec"] = summary["trained_tokens"] * n / elapsed
        if self.flops_per_token and self.peak_flops:
            summary["mfu"] = summary["tokens_per_sec"] * self.flops_per_token / self.peak_flops
        self._bar.set_postfix(
            loss=f"{summary['loss']:.3f}",
            acc=f"{summary['accuracy']:.3f}",
            tok_s=f"{summary['tokens_per_sec']:.0f}",
            refresh=False,
        )
        self._pending, self._tokens, self._timers, self._last_time = [], 0, {}, now
        return summary

    def print(self, text: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(text)

    def close(self) -> None:
        self._bar.close()


def keep_steps_until(path: str, last_step: int) -> None:
    """Drops the lines of the JSONL log ``path`` past ``last_step`` (written by a run that went
    on past the checkpoint it now resumes from) and any line cut short; rewrites it atomically.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    >>> _ = open(path, "w").write('{"step": 2}\\n{"step": 4}\\n{"step": 5}\\n{"st')
    >>> keep_steps_until(path, 4)
    >>> open(path).read()
    '{"step": 2}\\n{"step": 4}\\n'
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            kept.append(line)
    if kept != lines:
        atomic.write_text(path, "".join(line + "\n" for line in kept))


class MetricsWriter:
    """TensorBoard scalars under ``<workdir>/tensorboard`` and lines in ``<workdir>/metrics.jsonl``.

    A run that resumes from the checkpoint at ``start_step`` first drops the lines past it, so
    that each step is in the log once. Each line is written with one call and flushed: a failure
    can cut off at most the last line, which the next resume drops.
    """

    def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        if enabled:
            self._path = os.path.join(workdir, "metrics.jsonl")
            keep_steps_until(self._path, start_step)
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(self._path, "a", encoding="utf-8")

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        with self._tb.as_default(step=step):
            for k, v in scalars.items():
                tf.summary.scalar(f"{prefix}/{k}", v)
        try:
            self._jsonl.write(json.dumps({"step": step, prefix: scalars}) + "\n")
            self._jsonl.flush()
        except OSError as e:
            raise UserError(f"cannot write {self._path}: {e.strerror or e}; make room") from e

    def write_eval(self, step: int, results: dict) -> None:
        scalars = {"loss": results["eval_loss"], "accuracy": results["eval_accuracy"]}
        for source, loss in results["eval_loss_per_source"].items():
            scalars[f"loss/{source}"] = loss
        for group in ("trained_templates", "held_out_templates"):
            if group in results:
                scalars[f"{group}/exact_match"] = results[group]["exact_match"]
                for family, score in results[group]["per_family"].items():
                    scalars[f"{group}/{family}"] = score
        if results.get("tasks"):
            if results["tasks"]["overall"] is not None:  # None: no task is scored.
                scalars["tasks/overall"] = results["tasks"]["overall"]
            for name, task in results["tasks"]["tasks"].items():
                for metric, value in task["metrics"].items():
                    scalars[f"tasks/{name}/{metric}"] = value
        self.write(step, scalars, prefix="eval")

    def write_transcripts(self, step: int, transcripts: list[dict], workdir: str) -> None:
        """The evaluation's generated answers (`itune.evaluation.report.Report.outputs`):
        ``samples/step_<N>.txt`` and TensorBoard text."""
        if not self.enabled or not transcripts:
            return
        blocks = [eval_report.transcript(t) for t in transcripts]
        text = "\n\n".join(blocks)
        folder = os.path.join(workdir, "samples")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"step_{step:07d}.txt"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        with self._tb.as_default(step=step):
            tf.summary.text("eval/samples", "\n\n".join(f"    {b}" for b in blocks))

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def write_results(
    workdir: str, results: dict, num_samples: int, print_fn: Callable[[str], Any] = print
) -> None:
    """Writes ``eval_results.json`` (and the transcripts beside it) and prints a few samples."""
    transcripts = results.get("transcripts", [])
    atomic.write_text(
        os.path.join(workdir, "eval_results.json"),
        json.dumps({k: v for k, v in results.items() if k != "transcripts"}, indent=2),
    )
    atomic.write_text(
        os.path.join(workdir, "eval_transcripts.jsonl"),
        "".join(json.dumps(t) + "\n" for t in transcripts),
    )
    step = max(1, len(transcripts) // max(1, num_samples))
    for t in transcripts[::step][:num_samples]:
        print_fn(eval_report.one_line(t))
