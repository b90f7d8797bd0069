"""Ahead-of-time preflight: slice names, FLOPs through loops, and the smoke config compiled for a
TPU v5e-4 slice on this CPU host (libtpu's topology API, the ``tpu`` extra)."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from itune import topology
from itune.training import aot, flops
from tests.conftest import HANG_GUARD_S, REPO


@pytest.mark.parametrize(
    "name, topology_name, chips, hosts",
    [
        ("v4-8", "v4:2x2x1", 4, 1),
        ("v4-32", "v4:2x2x4", 16, 4),
        ("v4-128", "v4:4x4x4", 64, 16),
        ("v4-4096", "v4:8x16x16", 2048, 512),
        ("v5p-8", "v5:2x2x1", 4, 1),
        ("v5p-64", "v5:2x4x4", 32, 8),
        ("v5p-256", "v5:4x4x8", 128, 32),
        ("v5p-384", "v5:4x4x12", 192, 48),
        ("v5p-2048", "v5:8x8x16", 1024, 256),
        ("v5e-1", "v5e:1x1", 1, 1),
        ("v5e-4", "v5e:2x2", 4, 1),
        ("v5e-8", "v5e:2x4", 8, 1),
        ("v5litepod-16", "v5e:4x4", 16, 4),
        ("v5e-256", "v5e:16x16", 256, 64),
        ("v6e-16", "v6e:4x4", 16, 4),
        ("v6e-256", "v6e:16x16", 256, 64),
    ],
)
def test_slice_names_map_to_libtpu_topologies(name, topology_name, chips, hosts):
    t = topology.parse_slice(name)
    assert (t.topology_name, t.num_chips, t.num_hosts) == (topology_name, chips, hosts)
    assert t.chip.chip_config == ("megacore" if name.startswith(("v4", "v5p")) else "default")


def test_multi_slice_and_chip_figures():
    t = topology.parse_slice("v5p-256", num_slices=2)
    assert (t.topology_name, t.num_slices, t.num_chips, t.wrap) == ("v5:4x4x8", 2, 256, (True,) * 3)
    assert topology.parse_slice("v5e-256").wrap == (True, True, False)
    assert topology.parse_slice("v5p-64").wrap == (False,) * 3
    assert topology.chip_for_device_kind("TPU v5 lite").name == "v5e"
    assert topology.chip_for_device_kind("TPU v5").name == "v5p"
    assert topology.chip_for_device_kind("TPU v6 lite").hbm_bytes == 32 * 1024**3
    assert topology.chip_for_device_kind("cpu") is None


@pytest.mark.parametrize("name", ["v5p-63", "v5p-48", "v5e-12", "v3-8", "v5p", "tpu-64"])
def test_slices_that_do_not_exist_are_named(name):
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        topology.parse_slice(name)


def test_program_flops_count_every_scan_iteration_where_xla_counts_one():
    def stacked_matmuls(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    w, x = jnp.zeros((6, 64, 64)), jnp.zeros((8, 64))
    traced = jax.jit(stacked_matmuls).trace(w, x)
    assert flops.program_flops(traced.jaxpr) == 6 * 2 * 8 * 64 * 64
    xla = traced.lower().compile().cost_analysis()["flops"]
    assert 2 * 8 * 64 * 64 <= xla < 2 * 2 * 8 * 64 * 64  # One layer, and the tanh and sum.


def test_program_flops_count_grouped_products_on_every_device():
    """A ``ragged_dot`` inside ``jax.shard_map`` (the experts' products under expert
    parallelism), and its two transposes: each row times its own group's matrix, on every
    device of the mesh."""
    from jax.sharding import PartitionSpec

    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    per_device = jax.shard_map(
        lambda x, w, sizes: jax.lax.ragged_dot(x, w, sizes),
        mesh=mesh,
        in_specs=(PartitionSpec("fsdp"), PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec("fsdp"),
    )
    x, w, sizes = jnp.ones((32, 16)), jnp.ones((3, 16, 24)), jnp.array([2, 5, 1], jnp.int32)
    product = 2 * 32 * 16 * 24  # Every row meets one matrix, not three.
    assert flops.program_flops(jax.jit(per_device).trace(x, w, sizes).jaxpr) == product
    loss = jax.grad(lambda x, w: jnp.sum(per_device(x, w, sizes) ** 2), argnums=(0, 1))
    assert flops.program_flops(jax.jit(loss).trace(x, w).jaxpr) == 3 * product


def _smoke(**overrides):
    spec = importlib.util.spec_from_file_location("smoke", REPO / "configs/smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    with config.unlocked():
        for key, value in overrides.items():
            section, field = key.split("__")
            config[section][field] = value
    return config


def test_step_flops_do_not_depend_on_how_the_loops_run():
    """The train step's program FLOPs are the same with its layers scanned or unrolled and its
    batch in one or two microbatches; XLA's count (CPU here) matches them only with no loop."""
    devices = jax.devices()
    results = {
        (scan, k): aot.compile_for_devices(
            _smoke(model__scan_layers=scan, train__microbatches=k), devices
        ).flops
        for scan, k in [(False, 1), (True, 1), (True, 2)]
    }
    unrolled = results[(False, 1)]
    for result in results.values():
        assert result.program == pytest.approx(unrolled.program, rel=1e-9)
        assert result.model == unrolled.model
    # Seeing every layer, XLA counts their elementwise work too, but merges the scores the
    # attention backward recomputes with the forward's: within a few percent of the program.
    assert 0.95 * unrolled.program < unrolled.xla < 1.15 * unrolled.program
    assert results[(True, 2)].xla < results[(True, 1)].xla < 0.8 * unrolled.program
    # Beyond the model's 6 FLOPs per weight per token: the causal mask's other half.
    assert unrolled.model < unrolled.program < 1.3 * unrolled.model


def _preflight(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # The preflight's devices are the slice's, not forced CPU ones.
    return subprocess.run(
        [sys.executable, "-m", "itune.cli.preflight", "--config=configs/smoke.py", *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
        env=env,
    )


def _gib(text: str, row: str) -> float:
    value, unit = re.search(rf"\| \**{row}\** \| \**([\d.]+) (\w+)", text).groups()
    return float(value) * {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1}[unit]


def test_preflight_compiles_the_smoke_config_for_a_v5e_4_slice():
    result = _preflight("--topology=v5e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "on v5e-4 (v5e:2x2, 4 chips of 16 GiB in 1 host(s))" in out
    assert "mesh (data 1, fsdp 4, tensor 1)" in out
    total = _gib(out, "total")
    assert 0 < total < 16 and re.search(r"of 16.00 GiB HBM \(\d+%\)", out)
    assert _gib(out, "parameters") > 0 and _gib(out, "optimizer state") > _gib(out, "parameters")
    model = float(re.search(r"\| model: [^|]+\| ([\d.e+]+) \|", out).group(1))
    program = float(re.search(r"\| program: [^|]+\| ([\d.e+]+) \|", out).group(1))
    assert model < program < 1.3 * model
    assert re.search(r"\| 40% \| [\d.]+ m?s \|", out) and re.search(r"\| 60% \|", out)


def test_preflight_compiles_for_two_slices_with_data_parallelism_across_them():
    result = _preflight("--topology=v5e-4", "--num_slices=2", "--config.mesh.data=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x v5e-4 (v5e:2x2 each, 8 chips of 16 GiB in 2 host(s))" in result.stdout
    assert "mesh (data 2, fsdp 4, tensor 1)" in result.stdout


def test_preflight_of_a_step_that_does_not_fit_gives_figures_and_hints():
    result = _preflight(
        "--topology=v5e-4", "--config.data.global_batch_size=256", "--config.data.seq_len=4096"
    )
    assert result.returncode == 1, result.stderr[-3000:]
    out = result.stdout
    assert "DOES NOT FIT" in out and "RESOURCE_EXHAUSTED" in out
    assert re.search(r"as XLA counts them \| [\d.]+G \|", out)
    assert "--config.model.remat=save_dots" in out
    assert "--config.train.microbatches=2" in out


@pytest.mark.parametrize(
    "name, slice_name",
    [
        ("llama3_8b_sft", "v5p-64"),
        ("llama3_70b_sft", "v5p-256"),
        ("gemma_2b_sft", "v5e-16"),
        ("qwen3_30b_a3b_sft", "v5p-32"),
        ("mixtral_8x7b_sft", "v5p-32"),
        ("gemma3_27b_sft", "v5p-32"),
    ],
)
def test_real_scale_configs_name_their_topology(name, slice_name):
    spec = importlib.util.spec_from_file_location(name, REPO / f"configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.preflight.topology == slice_name
    assert config.data.seq_len == 4096
    t = topology.parse_slice(slice_name)
    assert config.data.global_batch_size % t.num_chips == 0  # Whole rows on every chip.
    assert f"itune-preflight --config=configs/{name}.py" in module.__doc__
    assert "launch/tpu.sh run" in module.__doc__
