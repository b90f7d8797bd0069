"""The sampler: cached decoding against full recomputation, batching, sampling filters, mesh."""

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itune import sharding
from itune.evaluation import sampler
from itune.model.decoder import Decoder
from tests.util import tiny_model_config

PAD = 0


def _model(seed=0, **overrides):
    cfg = tiny_model_config(vocab_size=96, **overrides)
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    return model, graphdef, params


def _prompts(lengths=(3, 11, 6, 1, 17), seed=0, vocab=96):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


def _full_logits(model, sequence):
    """Logits at every position of one unpadded sequence, recomputed from scratch."""
    tokens = jnp.asarray([sequence], jnp.int32)
    positions = jnp.arange(len(sequence), dtype=jnp.int32)[None]
    return np.asarray(model(tokens, positions, jnp.ones_like(tokens)))[0]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"scan_layers": False}, {"sliding_window": 4}, {"qkv_bias": True, "embed_scale": True}],
    ids=["scan", "unrolled", "sliding_window", "bias_and_scale"],
)
def test_cached_decoding_matches_recomputing_the_whole_sequence(overrides):
    model, graphdef, params = _model(**overrides)
    prompts = _prompts()
    steps = 12
    outputs, logits = sampler.generate(
        graphdef,
        params,
        prompts,
        sampler.SamplingConfig(max_new_tokens=steps),
        pad_id=PAD,
        return_logits=True,
    )
    for prompt, generated, row_logits in zip(prompts, outputs, logits):
        assert len(generated) == steps
        full = _full_logits(model, prompt + generated)
        # The logits that chose generated token i sit at position len(prompt) - 1 + i.
        expected = full[len(prompt) - 1 : len(prompt) - 1 + steps]
        np.testing.assert_allclose(row_logits, expected, atol=2e-5, rtol=2e-5)
        assert generated == np.argmax(expected, axis=-1).tolist()


def test_batched_generation_equals_one_prompt_at_a_time():
    _, graphdef, params = _model()
    prompts = _prompts()
    for sampling in (
        sampler.SamplingConfig(max_new_tokens=10),
        sampler.SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=20, seed=3),
    ):
        batched = sampler.generate(graphdef, params, prompts, sampling, pad_id=PAD, batch_size=8)
        alone = [
            sampler.generate(graphdef, params, prompts[i:], sampling, pad_id=PAD, batch_size=1)[0]
            for i in range(len(prompts))
        ]
        # Prompt i draws with key i of the request: compare each alone-run's first output to
        # the batched run's output of a request starting at i.
        again = [
            sampler.generate(graphdef, params, prompts[i:], sampling, pad_id=PAD, batch_size=8)[0]
            for i in range(len(prompts))
        ]
        assert alone == again
        if sampling.temperature == 0:
            assert batched == alone


def test_greedy_is_deterministic_and_seeded_sampling_repeats():
    _, graphdef, params = _model()
    prompts = _prompts()
    greedy = sampler.SamplingConfig(max_new_tokens=8)
    first = sampler.generate(graphdef, params, prompts, greedy, pad_id=PAD)
    assert first == sampler.generate(graphdef, params, prompts, greedy, pad_id=PAD)
    hot = sampler.SamplingConfig(max_new_tokens=8, temperature=1.5, seed=1)
    a = sampler.generate(graphdef, params, prompts, hot, pad_id=PAD)
    assert a == sampler.generate(graphdef, params, prompts, hot, pad_id=PAD)
    other_seed = sampler.SamplingConfig(max_new_tokens=8, temperature=1.5, seed=2)
    compiled = sampler._generate._cache_size()
    assert a != sampler.generate(graphdef, params, prompts, other_seed, pad_id=PAD)
    assert sampler._generate._cache_size() == compiled, "a new seed compiled a new program"
    assert a != first


def test_stop_tokens_end_a_row_and_are_not_returned():
    _, graphdef, params = _model()
    prompts = _prompts()
    free = sampler.generate(
        graphdef, params, prompts, sampler.SamplingConfig(max_new_tokens=10), pad_id=PAD
    )
    # Stop each row at the third token it generates freely.
    stop_ids = tuple(sorted({row[2] for row in free}))
    stopped = sampler.generate(
        graphdef,
        params,
        prompts,
        sampler.SamplingConfig(max_new_tokens=10, stop_ids=stop_ids),
        pad_id=PAD,
    )
    for row, cut in zip(free, stopped):
        first_stop = next(k for k, t in enumerate(row) if t in stop_ids)
        assert cut == row[:first_stop]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda k, p: np.isfinite(np.asarray(sampler.filter_logits(logits, k, p)))[0].tolist()
    assert kept(2, 1.0) == [True, True, False, False, False]
    assert kept(0, 0.5) == [True, False, False, False, False]  # 0.5 alone reaches 0.5.
    assert kept(0, 0.6) == [True, True, False, False, False]
    assert kept(0, 0.86) == [True, True, True, True, False]
    assert kept(3, 0.6) == [True, True, False, False, False]
    # Sampled tokens only ever come from the kept set.
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.vmap(
        lambda k: sampler.pick_tokens(
            logits, k[None], sampler.SamplingConfig(temperature=1.0, top_k=3)
        )
    )(keys)
    assert set(np.asarray(draws).ravel().tolist()) == {0, 1, 2}


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.1]]))
    keys = jax.random.split(jax.random.key(1), 20000)
    draws = jax.vmap(
        lambda k: sampler.pick_tokens(logits, k[None], sampler.SamplingConfig(temperature=1.0))
    )(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.015)


def test_sharded_generation_matches_one_device():
    _, graphdef, params = _model()
    prompts = _prompts(lengths=(3, 11, 6, 1, 17, 9, 2))
    config = sampler.SamplingConfig(max_new_tokens=8)
    single, single_logits = sampler.generate(
        graphdef, params, prompts, config, pad_id=PAD, return_logits=True
    )
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
    rules = sharding.DEFAULT_RULES
    # The same parameters in a model that constrains its activations by the rules.
    sharded_graphdef, _ = nnx.split(
        Decoder(tiny_model_config(vocab_size=96), rules, rngs=nnx.Rngs(1))
    )
    placed = jax.device_put(params, sharding.state_shardings(params, mesh, rules))
    sharded, sharded_logits = sampler.generate(
        sharded_graphdef,
        placed,
        prompts,
        config,
        pad_id=PAD,
        mesh=mesh,
        rules=rules,
        return_logits=True,
    )
    assert sharded == single
    np.testing.assert_allclose(sharded_logits, single_logits, atol=2e-5, rtol=2e-5)


def test_bad_sampling_settings_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        sampler.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampler.SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="seed"):
        sampler.SamplingConfig(seed=-1)
