"""The learning-rate schedule and the weight-decay mask."""

import numpy as np
from flax import nnx

from itune.model.decoder import Decoder
from itune.training import optimizer
from tests.util import optim_config, tiny_model_config


def test_schedule_warms_up_from_the_first_step_then_decays_to_the_floor():
    config = optim_config(learning_rate=1e-3, warmup_steps=10, min_learning_rate_ratio=0.1)
    schedule = optimizer.learning_rate_schedule(config, num_steps=100)
    assert np.isclose(schedule(0), 1e-4) and np.isclose(schedule(10), 1e-3)
    assert schedule(50) < schedule(10) and np.isclose(schedule(100), 1e-4)


def test_weight_decay_skips_norms_and_embeddings():
    params = nnx.state(Decoder(tiny_model_config(), rngs=nnx.Rngs(0)))
    mask = nnx.to_pure_dict(optimizer.weight_decay_mask(params))
    assert mask["embed"] is False and mask["final_norm"]["scale"] is False
    assert mask["blocks"]["attn_norm"]["scale"] is False
    assert mask["blocks"]["mlp"]["gate"] is True and mask["blocks"]["attn"]["q"] is True
