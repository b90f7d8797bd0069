"""Which model a config trains (`itune.convert.run_model.resolve`): the same answer for a run,
for ``itune-plan`` and ``itune-preflight`` (which have no workdir) and for a workdir read back
as a model (without its optimizer); and plan and preflight on every shipped config."""

import importlib.util
import json
import os
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx

from itune.convert import model_dir, run_model
from itune.errors import ConfigError
from tests.conftest import REPO

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if not p.name.startswith("_"))


def _config(name, request, arg=None):
    path = REPO / f"configs/{name}.py"
    if "NEEDS_SHARED" in path.read_text():
        request.getfixturevalue("shared_dir")  # Skips (or fails in CI) without ../shared.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_a_vocabulary_planned_without_a_workdir_is_the_one_the_run_trains(
    request, tmp_path, monkeypatch
):
    config = _config("smoke", request)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    planned = run_model.resolve(config)
    assert list(scratch.iterdir()) == []  # Trained in a temporary folder, gone again.
    trained = run_model.resolve(config, str(tmp_path / "run"))
    assert planned.config == trained.config
    # A corpus gets the pieces it supports: data.tokenizer.vocab_size only bounds them.
    assert 256 < planned.config.vocab_size < config.data.tokenizer.vocab_size
    assert planned.vocabulary.startswith("trained on the built-in tasks here")
    assert trained.tokenizer.vocab_size == trained.config.vocab_size
    assert planned.architecture == "config.model (preset tiny)"


def test_a_vocabulary_to_train_on_data_files_counts_at_its_bound(request):
    config = _config("smoke", request)
    with config.unlocked():
        config.data.sources = {"chats": {"path": "/not/on/this/host.jsonl"}}
    run = run_model.resolve(config)  # Reads no data.
    assert run.config.vocab_size == config.data.tokenizer.vocab_size
    assert run.tokenizer is None and "an upper bound" in run.vocabulary


def test_a_tokenizer_file_that_is_not_here_is_named(request):
    config = _config("smoke", request)
    with config.unlocked():
        config.data.tokenizer.path = "/not/on/this/host/tokenizer.model"
    with pytest.raises(ConfigError, match=r"data.tokenizer.path=/not/on.*model.vocab_size=N"):
        run_model.resolve(config)


def test_an_init_from_not_on_this_host_leaves_config_model(request):
    config = _config("llama3_8b_sft", request)
    with config.unlocked():
        config.init_from = "/not/on/this/host/Meta-Llama-3-8B-Instruct"
    run = run_model.resolve(config)
    assert run.config.num_params() > 8e9 and run.config.vocab_size == 128_256
    assert run.architecture.startswith("config.model (preset llama3-8b) (init_from=/not/on")
    assert run.vocabulary == "preset llama3-8b"
    with pytest.raises(FileNotFoundError):  # A run cannot start without its weights.
        run_model.resolve(config, "/tmp/never-written")


def test_init_from_gives_the_architecture_and_config_model_the_numerics(request):
    config = _config("smollm2_gsm8k", request, "lora")
    with config.unlocked():
        config.model.dtype = "bfloat16"
    run = run_model.resolve(config)
    assert run.architecture == f"init_from={config.init_from}"
    assert run.vocabulary == "the pretrained model's"
    assert (run.config.vocab_size, run.config.d_model, run.config.num_layers) == (49_152, 576, 30)
    assert (run.config.dtype, run.config.lora_rank) == ("bfloat16", 16)  # LoRA may change.
    assert run.chat_format and run.tokenizer.vocab_size == 49_152
    with config.unlocked():
        config.model.mlp_dim = 64
    with pytest.raises(ConfigError, match=r"model.mlp_dim=64 \(the model has 1536\)"):
        run_model.resolve(config)


def _save_run(config, workdir):
    """A run's workdir as training leaves it: config.json, tokenizer/ and a checkpoint of the
    train state (parameters and AdamW state) at step 1."""
    from itune import sharding
    from itune.training import checkpoint, optimizer, state as state_lib

    model_config = run_model.resolve(config, str(workdir)).config
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    rules = sharding.rules_from_config(config.mesh)
    tx = optimizer.make_model_optimizer(config.optim, config.train.num_steps, model_config)
    layout = state_lib.state_layout(model_config, tx, mesh, rules, config.seed)
    state = state_lib.init_train_state(layout, model_config, tx, mesh, rules, config.seed)
    state = state.replace(step=state.step + 1)
    manager = checkpoint.manager(str(workdir), config.checkpoint)
    checkpoint.save(manager, state, {"config": json.loads(config.to_json_best_effort())})
    checkpoint.close(manager)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return state


def test_a_workdir_is_read_without_its_optimizer(request, tmp_path):
    config = _config("smoke", request, "runlocal")
    state = _save_run(config, tmp_path)
    # The optimizer the run's config names now keeps other state than the checkpoint holds
    # (Adafactor's factored moments, not AdamW's): reading the weights never looks at it.
    run = json.loads((tmp_path / "config.json").read_text())
    run["optim"]["name"] = "adafactor"
    (tmp_path / "config.json").write_text(json.dumps(run))
    loaded = model_dir.load_model(str(tmp_path))
    assert loaded.config == run_model.resolve(config, str(tmp_path)).config
    expected = dict(nnx.to_flat_state(state.params))
    got = dict(nnx.to_flat_state(loaded.params))
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path].get_value(), value.get_value(), err_msg=str(path))
    # 'auto' with no model to start from is chatml.
    assert config.data.chat_format == "auto" and loaded.chat_format == "chatml"


def _slice(config) -> tuple[str, int]:
    """The config's own TPU slice, or the smallest one that its batch divides over."""
    return config.preflight.topology or "v5e-4", config.preflight.num_slices


@pytest.mark.parametrize("name", CONFIGS)
def test_plan_of_every_shipped_config(name, request):
    from itune import topology
    from itune.cli import plan

    config = _config(name, request)
    chips = topology.parse_slice(*_slice(config)).num_chips
    text = plan.format_plan(config, chips)
    run = run_model.resolve(config)
    header, model_line = text.splitlines()[:2]
    assert f"{run.config.num_params() / 1e6:,.1f}M parameters" in header
    assert model_line == (
        f"model: {run.architecture}; vocabulary {run.config.vocab_size:,}: {run.vocabulary}"
    )
    assert text.splitlines()[-1].startswith("per device: parameters ")


@pytest.fixture(scope="module")
def libtpu_environment():
    """What `itune-preflight` sets before libtpu loads (its topology API only: the host's TPU,
    if any, stays untouched)."""
    from itune.cli import preflight

    saved = dict(os.environ)
    preflight._set_up_environment()
    preflight._describe_host_to_libtpu("v5e-4")
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("name", CONFIGS)
def test_preflight_of_every_shipped_config(name, request, libtpu_environment):
    """The command up to XLA's compilation, for the config at full size on its own slice: the
    model it trains, the train step over the slice's devices, its inputs' bytes per device.
    (Compiling takes minutes for the large models; tests/test_preflight.py compiles smoke.)"""
    from itune.cli import preflight

    config = _config(name, request)
    slice_name, num_slices = _slice(config)
    topology, run, lowered = preflight.lower(config, slice_name, num_slices)
    assert lowered.model_config == run.config == run_model.resolve(config).config
    chips = topology.num_chips
    assert lowered.mesh.devices.size == chips
    whole = run.config.num_params() * np.dtype(run.config.param_dtype).itemsize
    # Sharded over the slice: each chip holds a share, never less than an even one.
    assert whole / chips <= lowered.inputs.parameters < whole
    assert lowered.inputs.optimizer_state > lowered.inputs.parameters  # AdamW: two moments.
    assert lowered.model_flops > 0
