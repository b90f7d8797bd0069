"""Starting a run from a pretrained model: ``config.init_from``.

``init_from`` names anything `itune.convert.model_dir.load_model` reads (an itune model folder, a
Hugging Face folder, a GGUF file or another run's workdir). The run takes the model's
architecture and tokenizer (`itune.convert.run_model.resolve`) and, at step 0, its weights;
LoRA adapters and the optimizer state start fresh. A run that already has a checkpoint resumes
from it and reads only the model's description.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from itune import sharding
from itune.model.decoder import Decoder, ModelConfig
from itune.training import state as state_lib


def initial_state(
    config: Any,
    layout: state_lib.StateLayout,
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.LogicalRules,
) -> state_lib.TrainState:
    """Step 0 of a run: fresh parameters, or ``init_from``'s weights (and fresh adapters)."""
    if not config.get("init_from"):
        return state_lib.init_train_state(layout, model_config, tx, mesh, rules, config.seed)
    from itune.convert import model_dir  # noqa: PLC0415
    from itune.model import lora  # noqa: PLC0415

    plain = lora.without_lora(model_config)
    keep = ("param_dtype", "dtype", "attention", "scan_layers", "remat")
    loaded = model_dir.load_model(
        config.init_from, mesh, rules, **{k: getattr(plain, k) for k in keep}
    )
    logging.info("Initialised from %s (%s)", config.init_from, loaded.config)

    def init(pretrained):
        params = nnx.state(Decoder(model_config, rules, rngs=nnx.Rngs(config.seed)))
        flat = dict(nnx.to_flat_state(params))
        for path, value in nnx.to_flat_state(pretrained):
            flat[path] = flat[path].replace(value.get_value())
        params = nnx.from_flat_state(sorted(flat.items()))
        return state_lib.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
        )

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=layout.shardings)(loaded.params)
