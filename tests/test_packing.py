"""The packer: rows, segments, positions, truncation and drops."""

import numpy as np
import pytest

from itune.data import packing


def _example(n, trained=True):
    ids = np.arange(1, n + 2, dtype=np.int32)
    mask = np.ones(n + 1, np.int32) if trained else np.zeros(n + 1, np.int32)
    return packing.to_next_token(ids, mask)


def test_first_fit_rows_have_segments_and_restarting_positions():
    packer = packing.Packer(seq_len=10, max_open_rows=2)
    rows = list(packing.pack([_example(n) for n in (6, 5, 3, 4, 2)], packer))
    # 6 -> row A; 5 -> row B; 3 -> A (9); 4 -> B (9); 2 -> buffer full: emit A, open C.
    assert len(rows) == 3
    a = rows[0]
    np.testing.assert_array_equal(a["segment_ids"], [1] * 6 + [2] * 3 + [0])
    np.testing.assert_array_equal(a["positions"], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0])
    np.testing.assert_array_equal(a["inputs"][:9], [1, 2, 3, 4, 5, 6, 1, 2, 3])
    np.testing.assert_array_equal(a["targets"][:9], [2, 3, 4, 5, 6, 7, 2, 3, 4])
    assert a["loss_mask"][9] == 0 and a["inputs"][9] == 0
    assert packer.stats.rows == 3 and packer.stats.tokens == 20 and packer.stats.packed == 5
    assert abs(packer.stats.efficiency(10) - 20 / 30) < 1e-9


def test_long_examples_are_truncated_and_untrainable_ones_dropped_and_counted():
    packer = packing.Packer(seq_len=8, max_open_rows=2)
    rows = list(packing.pack([_example(12), _example(3, trained=False), _example(0)], packer))
    assert len(rows) == 1 and rows[0]["segment_ids"].tolist() == [1] * 8
    stats = packer.stats
    assert stats.truncated == 1 and stats.packed == 1 and stats.examples == 3
    assert stats.longest == 12
    assert stats.dropped == {"no trained token": 1, "empty": 1}
    assert "dropped: 1 empty, 1 no trained token" in stats.summary(8)


def test_next_token_pairs_never_cross_segments():
    packer = packing.Packer(seq_len=16, max_open_rows=1)
    rows = list(packing.pack([_example(4), _example(5)], packer))
    row = rows[0]
    for seg in (1, 2):
        where = row["segment_ids"] == seg
        # Within a segment, each target is the next input.
        np.testing.assert_array_equal(row["targets"][where][:-1], row["inputs"][where][1:])


def test_packed_loss_equals_unpacked_loss(builtin_tokenizer):
    """The packing contract: packing changes the layout, never the loss."""
    import jax.numpy as jnp
    from flax import nnx

    from itune.data import chat, synthetic_tasks
    from itune.model.decoder import Decoder
    from itune.training.step import loss_fn
    from tests.util import tiny_model_config

    fmt, seq_len = chat.CHATML, 96
    examples = []
    for i in range(12):
        messages = synthetic_tasks.make_example(0, i, "train")["messages"]
        ids, mask = chat.tokenize(chat.render(messages, fmt), builtin_tokenizer, fmt)
        examples.append(packing.to_next_token(ids, mask))
    packer = packing.Packer(seq_len, max_open_rows=4)
    packed = list(packing.pack(examples, packer))
    assert packer.stats.packed == 12 and len(packed) < 12  # Really packed.
    # The same examples one per row, padded.
    unpacked = [row for ex in examples for row in packing.pack([ex], packing.Packer(seq_len))]
    assert len(unpacked) == 12

    model = Decoder(tiny_model_config(vocab_size=builtin_tokenizer.vocab_size), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def stack(rows):
        return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in packing.ROW_FIELDS}

    packed_loss, packed_sums = loss_fn(params, graphdef, stack(packed))
    unpacked_loss, unpacked_sums = loss_fn(params, graphdef, stack(unpacked))
    assert float(packed_sums["weight_sum"]) == float(unpacked_sums["weight_sum"]) > 0
    np.testing.assert_allclose(float(packed_loss), float(unpacked_loss), rtol=1e-5, atol=1e-5)


def test_truncation_policies_cut_the_end_the_start_or_drop():
    ids = np.arange(1, 14, dtype=np.int32)  # 12 next-token pairs.
    mask = np.array([0] * 6 + [1] * 7, np.int32)
    example = packing.to_next_token(ids, mask)
    rows = {}
    for policy in packing.TRUNCATION:
        packer = packing.Packer(seq_len=8, truncation=policy)
        rows[policy] = list(packing.pack([example], packer))
        if policy == "drop":
            assert rows[policy] == [] and packer.stats.dropped == {"longer than seq_len": 1}
        else:
            assert packer.stats.truncated == 1 and len(rows[policy]) == 1
    np.testing.assert_array_equal(rows["truncate_response"][0]["inputs"], np.arange(1, 9))
    np.testing.assert_array_equal(rows["truncate_prompt_left"][0]["inputs"], np.arange(5, 13))
    np.testing.assert_array_equal(rows["truncate_prompt_left"][0]["targets"], np.arange(6, 14))
    # Cutting the prompt keeps the whole answer trained.
    assert rows["truncate_prompt_left"][0]["loss_mask"].sum() == 7
    with pytest.raises(ValueError, match="data.truncation='middle'"):
        packing.Packer(8, truncation="middle")


def test_a_dropped_share_over_the_threshold_is_a_warning(caplog):
    from itune.data import pipeline

    stats = packing.PackingStats(examples=100, packed=97)
    stats.dropped["no trained token"] = 3
    with caplog.at_level("WARNING"):
        pipeline.log_stats("Train", stats, 16, max_dropped_share=0.05)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("WARNING"):
        pipeline.log_stats("Train", stats, 16, max_dropped_share=0.01)
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning and "3 of 100 examples (3.0%) were dropped (3 no trained token)" in warning[0]
