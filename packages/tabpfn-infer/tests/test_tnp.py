"""The TransformerNP, its training step (eager, CUDA graph, DDP) and the train-tnp CLI."""

from __future__ import annotations

import copy
import json
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from tabattn_core.checks import InputError
from tabattn_core.testing import REL_TOL, assert_rel_close, rel_error
from tabpfn_infer.cli import main
from tabpfn_infer.training.prior import sample_tasks
from tabpfn_infer.training.tnp import KERNELS, TNPConfig, TransformerNP
from tabpfn_infer.training.train_tnp import (
    TNPTrainConfig,
    TNPTrainer,
    load_tnp_checkpoint,
    save_tnp_checkpoint,
    train_tnp,
)

TINY = TNPConfig(
    dim_x=2, d_model=32, n_heads=2, n_layers=2, d_ff=40, num_components=3, backend="torch"
)


def _tasks(batch, m, n, dim_x, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    t = sample_tasks(
        batch, num_context=m, num_buffer=0, num_target=n, num_features=dim_x, generator=gen
    )
    return t.to(device)


def _model(config=TINY, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return TransformerNP(config).to(device)


def _loss_and_grads(model, t):
    model.zero_grad(set_to_none=True)
    loss = model(t.x_context, t.y_context, t.x_target, t.y_target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_shapes_and_input_errors():
    model, t = _model(), _tasks(3, 11, 5, 2)
    loss = model(t.x_context, t.y_context, t.x_target, t.y_target)
    assert loss.shape == () and torch.isfinite(loss)
    logits, loc, log_std = model.mixture(t.x_context, t.y_context, t.x_target)
    assert logits.shape == loc.shape == log_std.shape == (3, 5, 3)
    assert model.encode(t.x_context, t.y_context, t.x_target).shape == (3, 16, 32)
    with pytest.raises(InputError, match="x_target"):
        model(t.x_context, t.y_context, t.x_target[:2], t.y_target)
    with pytest.raises(InputError, match="y_target"):
        model(t.x_context, t.y_context, t.x_target, t.y_target[:, :4])
    with pytest.raises(InputError, match="x_context"):
        model(t.x_context[..., :1], t.y_context, t.x_target, t.y_target)
    with pytest.raises(InputError, match="n_heads"):
        TNPConfig(d_model=32, n_heads=3)
    with pytest.raises(InputError, match="head dim"):
        TNPConfig(d_model=32, n_heads=4)
    with pytest.raises(InputError, match="kernel"):
        TINY.backend_of("softmax")
    assert replace(TINY, head_backend="triton").backend_of("head") == "triton"
    assert replace(TINY, head_backend="triton").backend_of("mlp") == "torch"


def test_targets_see_the_context_only():
    """Changing target j changes row j alone; changing a context row changes every row."""
    model, t = _model(), _tasks(2, 9, 6, 2)
    m = t.x_context.shape[1]
    with torch.no_grad():
        base = model.encode(t.x_context, t.y_context, t.x_target)
        x_target = t.x_target.clone()
        x_target[:, 3] += 1.5
        moved = model.encode(t.x_context, t.y_context, x_target)
        y_context = t.y_context.clone()
        y_context[:, 4] -= 2.0
        context_moved = model.encode(t.x_context, y_context, t.x_target)
    others = [i for i in range(base.shape[1]) if i != m + 3]
    torch.testing.assert_close(moved[:, others], base[:, others], rtol=0, atol=1e-6)
    assert (moved[:, m + 3] - base[:, m + 3]).abs().max() > 1e-2
    assert ((context_moved - base).abs().amax(-1) > 1e-3).all()


def test_checkpointed_blocks_give_the_same_loss_and_gradients():
    model, t = _model(), _tasks(2, 10, 4, 2)
    loss, grads = _loss_and_grads(model, t)
    model.config.checkpoint_blocks = True
    loss_ckpt, grads_ckpt = _loss_and_grads(model, t)
    assert torch.equal(loss, loss_ckpt)
    for name, g in grads.items():
        assert_rel_close(grads_ckpt[name], g, tol=1e-6, name=name)


def test_training_steps_lower_the_loss_and_checkpoints_round_trip(tmp_path):
    model, t = _model(), _tasks(4, 24, 12, 2)
    trainer = TNPTrainer(model, batch=4, num_context=24, num_target=12, lr=3e-3)
    trainer.load(t)
    first = float(trainer.step())
    for _ in range(14):
        last = float(trainer.step())
    assert last < first - 0.1, (first, last)

    config = TNPTrainConfig(model=TINY, batch=4, num_context=24, num_target=12)
    save_tnp_checkpoint(tmp_path / "tnp.pt", trainer, config, step=15)
    loaded = load_tnp_checkpoint(tmp_path / "tnp.pt")
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    with torch.no_grad():
        assert torch.equal(
            loaded(t.x_context, t.y_context, t.x_target, t.y_target), trainer.forward()
        )

    # resuming: the next step from the saved optimizer state equals the next step here
    resumed = TNPTrainer(loaded.train(), batch=4, num_context=24, num_target=12, lr=3e-3)
    resumed.load_optimizer_state(torch.load(tmp_path / "tnp.pt", weights_only=True)["optimizer"])
    resumed.load(t)
    trainer.step(), resumed.step()
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_train_tnp_cli_writes_and_resumes_a_checkpoint(tmp_path, capsys):
    config = {
        "model": {**TINY.to_dict(), "n_layers": 1},
        "batch": 2, "num_context": 8, "num_target": 4, "warmup": 1, "log_every": 2,
    }  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(config))
    out = tmp_path / "tnp.pt"
    argv = ["train-tnp", "--config", str(tmp_path / "c.json"), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--steps", "3"]) == 0
    assert torch.load(out, weights_only=True)["step"] == 3
    assert main([*argv, "--steps", "5", "--resume", str(out)]) == 0
    data = torch.load(out, weights_only=True)
    assert data["step"] == 5 and data["config"]["model"]["n_layers"] == 1
    assert "checkpoint written" in capsys.readouterr().out
    with pytest.raises(InputError, match="unknown keys"):
        TNPTrainConfig.from_dict({"batchsize": 3})


def test_cuda_graph_under_ddp_is_refused_before_the_process_group(monkeypatch):
    """A CUDA-graph step with DDP is not supported: train_tnp says so under torchrun
    (WORLD_SIZE > 1) before it joins a process group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = TNPTrainConfig(model=TINY.to_dict(), batch=2, num_context=8, num_target=4,
                            steps=2, cuda_graph=True)  # fmt: skip
    with pytest.raises(InputError, match="cuda_graph: expected False with DDP"):
        train_tnp(config, progress=False)
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, path: str, cuda: bool) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    config = TNPTrainConfig(
        model={**TINY.to_dict(), "n_layers": 1, "backend": "auto"}, batch=2, num_context=8,
        num_target=4, steps=13, warmup=1, log_every=4, device="cuda" if cuda else "cpu",
    )  # fmt: skip
    with pytest.raises(InputError, match="cuda_graph: expected False with DDP"):
        train_tnp(replace(config, cuda_graph=True), progress=False)
    model, log = train_tnp(config, out=path if rank == 0 else None, progress=False)
    torch.save({"state": model.cpu().state_dict(), "log": log}, f"{path}.rank{rank}")


@pytest.mark.gpu
def test_ddp_ranks_stay_in_step_and_only_rank_0_logs_gpu(tmp_path):
    """Two ranks through torch.distributed (NCCL on two GPUs, else gloo on CPU; in the GPU
    tier because spawning two ranks costs ~30 s of CI time): a CUDA-graph step is refused
    under DDP before the process group starts; the same weights after training, log rows
    and the checkpoint from rank 0 only."""
    path, cuda = str(tmp_path / "ddp.pt"), torch.cuda.device_count() >= 2
    mp.spawn(_ddp_worker, args=(2, _free_port(), path, cuda), nprocs=2)
    r0, r1 = (torch.load(f"{path}.rank{r}", weights_only=True) for r in (0, 1))
    assert [row["step"] for row in r0["log"]] == [0, 3, 7, 11, 12] and not r1["log"]
    for name, p in r0["state"].items():
        assert torch.equal(p, r1["state"][name]), name
    assert torch.load(path, weights_only=True)["step"] == 13


# ---------------------------------------------------------------------------------------
# GPU: the reference widths (d_model 512, 8 heads of 64, d_ff 1365, K 10), bf16 autocast

GPU_CONFIG = TNPConfig(dim_x=3, n_layers=2)
ALL_TRITON = {f"{kernel}_backend": "triton" for kernel in KERNELS}


@pytest.mark.gpu
def test_step_with_every_kernel_on_matches_the_torch_step_gpu():
    """Loss and gradients of the all-Triton model under bf16 autocast are as close to the
    fp32 all-torch ones as torch's own bf16 run is (2x, or the bf16 bound); one optimizer
    step then lowers the loss the same."""
    device = torch.device("cuda")
    t = _tasks(4, 300, 77, 3, device=device)
    torch_model = _model(replace(GPU_CONFIG, backend="torch"), device=device)
    triton_model = copy.deepcopy(torch_model)
    triton_model.config = replace(GPU_CONFIG, **ALL_TRITON)
    ref_loss, ref_grads = _loss_and_grads(torch_model, t)  # fp32, no autocast
    results = {}
    for name, model in (("torch", torch_model), ("triton", triton_model)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[name] = _loss_and_grads(model, t)
    for i, quantity in enumerate(("loss", "grads")):
        pick = (
            (lambda r: r[0])
            if i == 0
            else (lambda r: torch.cat([g.flatten() for g in r[1].values()]))
        )
        ref = pick((ref_loss, ref_grads))
        bound = max(2 * rel_error(pick(results["torch"]), ref), REL_TOL[torch.bfloat16])
        assert_rel_close(pick(results["triton"]), ref, tol=bound, name=quantity)

    after = {}
    for name, model in (("torch", torch_model), ("triton", triton_model)):
        trainer = TNPTrainer(model, batch=4, num_context=300, num_target=77, lr=1e-4)
        trainer.load(t)
        trainer.step()
        with torch.no_grad():
            after[name] = trainer.forward()
    assert_rel_close(
        after["triton"], after["torch"], dtype=torch.bfloat16, name="loss after a step"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_cuda_graph_replay_equals_eager_steps_gpu(checkpoint_blocks):
    """Three steps on three batches with a changing learning rate: replaying the captured
    step gives the losses and weights of the same step run eagerly (same capturable AdamW;
    the capture's warm-up steps leave no trace)."""
    device = torch.device("cuda")
    config = replace(GPU_CONFIG, checkpoint_blocks=checkpoint_blocks)
    eager_model = _model(config, device=device)
    graph_model = copy.deepcopy(eager_model)
    shape = dict(batch=8, num_context=200, num_target=50, lr=1e-3, cuda_graph=True)
    eager, graph = TNPTrainer(eager_model, **shape), TNPTrainer(graph_model, **shape)
    for step in range(3):
        t = _tasks(8, 200, 50, 3, seed=step, device=device)
        for trainer in (eager, graph):
            trainer.load(t)
            trainer.set_lr(1e-3 * (step + 1))
        loss_eager, loss_graph = eager.eager_step(), graph.step().clone()
        assert graph.graph is not None and eager.graph is None
        assert_rel_close(loss_graph, loss_eager, tol=1e-3, name=f"loss at step {step}")
    for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters(), strict=True):
        assert_rel_close(q, p, tol=1e-3, name=name)
