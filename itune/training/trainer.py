"""The training loop: ``train_and_evaluate(config, workdir)``.

The loop only feeds batches, logs, evaluates and saves; the work is in the pure, jitted
`itune.training.step.train_step`, compiled once with explicit shardings over the mesh.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from itune import runtime, sharding
from itune.convert import run_model
from itune.data import held_out, pipeline
from itune.data import spec as data_spec
from itune.evaluation import in_training, sampler
from itune.evaluation import tasks as eval_tasks
from itune.evaluation.responder import Responder
from itune.training import checkpoint, feed, flops, metrics as metrics_lib, optimizer
from itune.training import preemption, pretrained, program, state as state_lib, step
from itune.training import workdir as workdir_lib


def train_and_evaluate(config: Any, workdir: str) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its last checkpoint); returns eval results."""
    pipeline.configure_tensorflow()
    # The config is loaded here (a config flag loads on first use) and checked against the run
    # in the workdir before anything there is written; config.json is replaced only once the
    # run is set up.
    config_json = config.to_json_best_effort(indent=2, sort_keys=True)
    workdir_lib.check_resume(json.loads(config_json), workdir)
    new_workdir = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    try:
        run = run_model.resolve(config, workdir)
        spec = data_spec.make_spec(config.data, workdir, run.tokenizer, run.chat_format)
        model_config = run.config
    except BaseException:
        if new_workdir:
            workdir_lib.remove_if_empty(workdir)
        raise
    num_steps = config.train.num_steps
    tx = optimizer.make_model_optimizer(config.optim, num_steps, model_config)
    schedule = optimizer.learning_rate_schedule(config.optim, num_steps)
    layout = state_lib.state_layout(model_config, tx, mesh, rules, config.seed)
    logging.info(
        "Model: %s, %.2fM parameters; mesh %s",
        model_config,
        model_config.num_params() / 1e6,
        dict(mesh.shape),
    )

    ckpt = checkpoint.manager(workdir, config.checkpoint)
    restored = checkpoint.restore_latest(ckpt, state_lib.abstract_with_shardings(layout))
    data_state = None
    if restored is None:
        state = pretrained.initial_state(config, layout, model_config, tx, mesh, rules)
    else:
        state, restored_meta = restored
        data_states = restored_meta.get("data_state") or []
        if len(data_states) == jax.process_count():
            data_state = data_states[jax.process_index()]
        else:
            logging.warning(
                "The checkpoint holds no input-pipeline state for %d processes; replaying the "
                "data stream to its step instead.",
                jax.process_count(),
            )
    start_step = int(state.step)

    batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    train_step = program.jit_train_step(
        config, layout, tx, schedule, model_config, mesh, rules, spec.source_names
    )
    eval_step = jax.jit(
        functools.partial(step.eval_step, graphdef=layout.graphdef),
        in_shardings=(layout.shardings.params, batch_sharding),
        out_shardings=replicated,
    )
    local_eval_batches, eval_stats = held_out.eval_batches(
        config.data, spec, config.eval.num_loss_examples
    )
    logging.info("Eval data: %s", eval_stats.summary(spec.seq_len))
    eval_batches = {
        name: [feed.global_batch(b, batch_sharding) for b in batches]
        for name, batches in local_eval_batches.items()
    }

    task_sets = eval_tasks.prompt_sets(config, spec)
    respond = functools.partial(
        Responder,
        layout.graphdef,
        tokenizer=spec.tokenizer,
        chat_format=spec.chat_format,
        # Each task kind's answer length, or eval.max_new_tokens, replaces the default's.
        sampling=sampler.SamplingConfig(),
        batch_size=config.eval.batch_size,
        mesh=mesh,
        rules=rules,
    )

    per_process_batch = spec.global_batch_size // jax.process_count()
    row_states = pipeline.RowStates(capacity=(config.data.prefetch + 8) * per_process_batch)
    reader_stop = threading.Event()
    dataset, packing_stats = pipeline.train_dataset(
        config.data, spec, start_step, data_state, row_states, stop=reader_stop
    )

    def to_device(local: dict) -> tuple[int, int, dict]:
        """(last row id, tokens in the global batch, the global batch on its devices)."""
        tokens = int((local["segment_ids"] > 0).sum()) * jax.process_count()
        return int(local[pipeline.ROW_ID][-1]), tokens, feed.global_batch(local, batch_sharding)

    batches = feed.BatchIterator(dataset, transform=to_device, stop=reader_stop)
    if jax.process_index() == 0:
        workdir_lib.write_config(workdir, config_json)
    writer = metrics_lib.MetricsWriter(workdir, jax.process_index() == 0, start_step)
    peak, peak_source = flops.total_peak(model_config.dtype)
    logging.info("Peak for MFU: %.3g FLOP/s (%s)", peak, peak_source)
    progress = metrics_lib.Progress(
        start_step,
        num_steps,
        config.train.log_every,
        flops_per_token=model_config.flops_per_token(spec.seq_len),
        peak_flops=peak,
    )
    meta = {"config": json.loads(config.to_json_best_effort())}
    results: dict = {}
    watch = preemption.PreemptionWatch()
    nonfinite_run = longest_run = jnp.zeros((), jnp.int32)

    def save(state, last_row, force=False):
        with progress.timer("checkpoint"):
            data_state = runtime.gather_json(row_states.after(last_row))
            checkpoint.save(ckpt, state, dict(meta, data_state=data_state), force=force)

    try:
        with jax.set_mesh(mesh):
            for step_num in range(start_step, num_steps):
                with progress.timer("data_wait"):
                    last_row, tokens, batch = next(batches)
                state, step_metrics = train_step(state, batch)
                # Consecutive skipped steps, counted on device so that the loop never waits for a
                # step; read at log steps, where the loop waits anyway.
                skipped = step_metrics["nonfinite"] > 0
                nonfinite_run = jnp.where(skipped, nonfinite_run + 1, 0)
                longest_run = jnp.maximum(longest_run, nonfinite_run)
                summary = progress.update(step_num + 1, step_metrics, tokens)
                if summary is not None:
                    writer.write(step_num + 1, summary)
                    if int(longest_run) >= config.train.max_nonfinite_steps:
                        raise FloatingPointError(
                            f"{int(longest_run)} steps in a row up to step {step_num + 1} had a "
                            "non-finite loss or gradient norm and were skipped; stopping (train."
                            "max_nonfinite_steps). Lower optim.learning_rate, check the data, or "
                            "restart from the last checkpoint."
                        )

                last = step_num + 1 == num_steps
                every = config.eval.every_steps
                if last or (every and (step_num + 1) % every == 0):
                    with progress.timer("eval"):
                        results = in_training.evaluate(
                            config, state.params, eval_step, eval_batches, respond, task_sets
                        )
                    in_training.write_report(results, workdir, step_num + 1, progress.print)
                    writer.write_eval(step_num + 1, results)
                    writer.write_transcripts(step_num + 1, results.get("transcripts", []), workdir)
                every = config.checkpoint.every_steps
                saved = last or bool(every and (step_num + 1) % every == 0)
                if saved:
                    save(state, last_row)
                checkpoint.check(ckpt)  # A save that failed in the background stops the run.
                if not last and watch.should_stop(step_num + 1, ckpt):
                    if not saved:
                        save(state, last_row, force=True)
                    checkpoint.finish(ckpt)
                    progress.print(
                        f"Stopped at step {step_num + 1} {watch.reason}; checkpoint saved. "
                        "Run the same command to resume."
                    )
                    results = {"preempted_at": step_num + 1}
                    break
            progress.close()
            checkpoint.finish(ckpt)  # The last save, before results that claim it.
    finally:
        # Also when the run stops on an error: the reader and Orbax's writer threads end here,
        # and closing the manager (not only waiting for it) lets its threads go.
        batches.close()
        watch.close()
        progress.close()  # Before any error is told.
        checkpoint.close(ckpt)
    pipeline.log_stats("Train", packing_stats, spec.seq_len, config.data.max_dropped_share)
    if not results and start_step >= num_steps:
        logging.info("Already trained to step %d; evaluating the last checkpoint.", num_steps)
        with jax.set_mesh(mesh):
            results = in_training.evaluate(
                config, state.params, eval_step, eval_batches, respond, task_sets
            )
        in_training.write_report(results, workdir, num_steps, progress.print)
    if "preempted_at" in results:
        writer.close()
        return results
    if jax.process_index() == 0:
        metrics_lib.write_results(
            workdir, results, config.eval.num_samples_to_print, progress.print
        )
    writer.close()
    return results
