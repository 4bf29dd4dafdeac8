"""The synthetic prior and the training loop."""

from __future__ import annotations

import pytest
import torch

from tabattn_core.checks import InputError
from tabpfn_infer.predictor import ARTabPFNPredictor
from tabpfn_infer.training.prior import sample_tasks
from tabpfn_infer.training.train import TrainConfig, config_from_dict, load_checkpoint, train


def test_prior_shapes_normalisation_and_seed():
    draw = lambda seed: sample_tasks(
        6,
        num_context=40,
        num_buffer=5,
        num_target=9,
        num_features=3,
        generator=torch.Generator().manual_seed(seed),
    )
    a, b, c = draw(0), draw(0), draw(1)
    assert (
        a.x_context.shape == (6, 40, 3)
        and a.y_buffer.shape == (6, 5)
        and a.x_target.shape == (6, 9, 3)
    )
    assert torch.equal(a.y_target, b.y_target) and not torch.equal(a.y_target, c.y_target)
    torch.testing.assert_close(a.y_context.mean(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.y_context.std(1), torch.ones(6), atol=1e-5, rtol=0)
    assert all(torch.isfinite(t).all() for t in (a.x_target, a.y_target))
    with pytest.raises(InputError, match="num_context"):
        sample_tasks(
            2,
            num_context=1,
            num_buffer=0,
            num_target=1,
            num_features=1,
            generator=torch.Generator(),
        )


def test_training_lowers_the_loss_and_checkpoints_round_trip(tmp_path):
    config = TrainConfig(
        d_model=32, n_heads=2, n_layers=2, d_ff=64, batch=16, num_context=24, num_buffer=4,
        num_target=16, steps=120, warmup=10, lr=3e-3, log_every=10, device="cpu", backend="torch",
    )  # fmt: skip
    model, log = train(config, out=tmp_path / "ckpt.pt", progress=False)
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.2, (first, last)
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    tasks = sample_tasks(
        2,
        num_context=24,
        num_buffer=0,
        num_target=5,
        num_features=2,
        generator=torch.Generator().manual_seed(9),
    )
    logp = ARTabPFNPredictor(loaded, backend="torch").evaluate_joint_density(
        tasks.x_context, tasks.y_context, tasks.x_target, tasks.y_target
    )
    assert torch.isfinite(logp).all()


def test_config_from_dict_rejects_unknown_keys():
    assert config_from_dict({"steps": 5}).steps == 5
    with pytest.raises(InputError, match="unknown keys"):
        config_from_dict({"stepz": 5})
