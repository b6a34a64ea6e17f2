"""The pretraining objectives of the new families see each packed document alone: on a real
batch of the pipeline, each masked position's loss (bert, masked LM) and each target
token's loss (t5, span corruption) equal the same document (example) computed unpacked,
alone in its row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import sources
from jaxlm.model import zoo
from jaxlm.train import pretraining


def task_for(family, tmp_path):
    """A task on a corpus of short paragraphs (several documents per row)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "pi", "rho"]
    corpus = tmp_path / "short.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(3, 9)))
                                   for _ in range(200)))
    cfg = config_lib.defaults()
    cfg.model.update(family=family, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                     max_seq_len=128)
    source = config_lib.source_defaults()
    source.update(kind="text", paths=str(corpus), split_by="blank_line")
    cfg.data.sources.short = source
    cfg.data.update(dataset="short", data_dir=str(tmp_path / "tfds"), seq_len=128,
                    global_batch_size=2)
    if family == "bert":
        cfg.objective.name = "masked_lm"
    else:
        cfg.objective.name = "span_corruption"
        cfg.model.update(n_decoder_layers=2, head_dim=8, relative_buckets=8,
                         relative_max_distance=16)
    return pretraining.task(cfg, num_devices=1)


def token_losses(logits_LxV, targets_L):
    log_p = jax.nn.log_softmax(np.asarray(logits_LxV, np.float64), axis=-1)
    return -np.take_along_axis(np.asarray(log_p), targets_L[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_each_packed_document_loses_as_if_alone(family, tmp_path):
    task = task_for(family, tmp_path)
    sources.prepare_all(task.cfg.data)
    batches = task.batches("train", rows=[0, 1])
    batch = next(batches)
    batches.close()
    model = zoo.create(task.cfg.model, seed=3)
    row = {k: v[:1] for k, v in batch.items()}
    if family == "bert":
        packed = model(jnp.asarray(row["inputs"]), jnp.asarray(row["positions"]),
                       jnp.asarray(row["segment_ids"]))[0]
    else:
        packed = model(jnp.asarray(row["inputs"]), jnp.asarray(row["decoder_inputs"]),
                       input_positions=jnp.asarray(row["input_positions"]),
                       input_segment_ids=jnp.asarray(row["input_segment_ids"]),
                       decoder_positions=jnp.asarray(row["positions"]),
                       decoder_segment_ids=jnp.asarray(row["segment_ids"]))[0]
    packed_losses = token_losses(packed, row["targets"][0])
    segments = row["segment_ids"][0]
    documents = [s for s in np.unique(segments) if s > 0]
    assert len(documents) >= 2, "the row should pack several documents"
    checked = 0
    for s in documents:
        where = segments == s
        weights = row["weights"][0][where] > 0
        if family == "bert":
            alone = model(jnp.asarray(row["inputs"][:, where]))[0]
        else:
            enc = row["input_segment_ids"][0] == s
            alone = model(jnp.asarray(row["inputs"][:, enc]),
                          jnp.asarray(row["decoder_inputs"][:, where]))[0]
        alone_losses = token_losses(alone, row["targets"][0][where])
        np.testing.assert_allclose(packed_losses[where][weights], alone_losses[weights],
                                   rtol=1e-4, atol=1e-5)
        checked += int(weights.sum())
    assert checked == int(row["weights"].sum())  # every trained position was compared
