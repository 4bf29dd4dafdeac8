"""ARTabPFN and ARTabPFNPredictor: the peer's golden densities, the chain rule, sampling
reproducibility, shared vs per-row contexts, edge sizes and bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tabattn_core.checks import InputError
from tabattn_core.logs import LogOnce
from tabpfn_infer.model import ARTabPFN, load_peer_state_dict
from tabpfn_infer.predictor import ARTabPFNPredictor

GOLDEN = Path(__file__).parent / "data" / "peer_default.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def peer_model(golden, dtype=torch.float32) -> ARTabPFN:
    model = ARTabPFN(**golden["config"]).to(dtype)
    return load_peer_state_dict(model, golden["state_dict"]).eval()


def small_model(seed=0, dtype=torch.float64) -> ARTabPFN:
    torch.manual_seed(seed)
    model = ARTabPFN(d_model=32, n_heads=2, n_layers=2, d_ff=48, buffer_size=3, num_components=3)
    return model.to(dtype).eval()


def task(b=3, nc=9, nt=5, c=2, shared=False, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    xc = torch.randn(1 if shared else b, nc, c, generator=gen, dtype=dtype).expand(b, nc, c)
    yc = torch.randn(1 if shared else b, nc, generator=gen, dtype=dtype).expand(b, nc)
    return (
        xc,
        yc,
        torch.randn(b, nt, c, generator=gen, dtype=dtype),
        torch.randn(b, nt, generator=gen, dtype=dtype),
    )


@pytest.mark.parametrize(
    "inputs, reference", [("inputs", "ejd_ref64"), ("inputs_distinct", "ejd_distinct_ref64")]
)
def test_golden_joint_density_float32(golden, inputs, reference):
    """The peer's float64 densities (shared and distinct contexts) within 1e-4 in float32."""
    data = golden[inputs]
    out = ARTabPFNPredictor(peer_model(golden), backend="torch").evaluate_joint_density(
        data["x_context"], data["y_context"], data["x_target"], data["y_target"]
    )
    assert out.shape == golden["outputs"][reference].shape
    assert (out.double() - golden["outputs"][reference]).abs().max() < 1e-4


def test_golden_joint_density_float64_exact(golden):
    data = golden["inputs"]
    out = ARTabPFNPredictor(
        peer_model(golden, torch.float64), backend="torch"
    ).evaluate_joint_density(
        data["x_context"], data["y_context"], data["x_target"], data["y_target"]
    )
    assert (out - golden["outputs"]["ejd_ref64"]).abs().max() < 1e-10


def test_head_dim_outside_kernel_range_rejected():
    with pytest.raises(InputError, match="n_heads"):
        ARTabPFN(d_model=16, n_heads=2)


def test_peer_checkpoint_keys_with_orig_mod(golden):
    wrapped = {
        k.replace("embedder.", "embedder._orig_mod.").replace("head.", "head._orig_mod.", 1)
        if k.startswith(("embedder.", "head.")) else k: v
        for k, v in golden["state_dict"].items()
    }  # fmt: skip
    model = load_peer_state_dict(ARTabPFN(**golden["config"]), {"step": 3, "model": wrapped})
    assert torch.equal(model.head.mean_bias, golden["state_dict"]["head.mean_bias"])
    assert sum(p.numel() for p in ARTabPFN().parameters()) == 1_225_630


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("nt", [1, 5])
def test_chain_rule(shared, nt):
    """The per-step conditionals of the sampling path with y fixed equal the one-pass
    teacher-forcing densities."""
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, yt = task(nt=nt, shared=shared)
    joint = predictor.evaluate_joint_density(xc, yc, xt, yt)
    stepwise = predictor.stepwise_log_density(xc, yc, xt, yt)
    torch.testing.assert_close(stepwise, joint, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(joint).all()


def test_shared_context_equals_per_row_runs():
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, yt = task(b=4, shared=True)
    together = predictor.evaluate_joint_density(xc, yc, xt, yt)
    alone = torch.cat(
        [
            predictor.evaluate_joint_density(
                xc[i : i + 1], yc[i : i + 1], xt[i : i + 1], yt[i : i + 1]
            )
            for i in range(4)
        ]
    )
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10)


def test_sampling_is_reproducible_and_depends_on_the_seed():
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, _ = task(shared=True)
    draw = lambda seed: predictor.sample_sequence(
        xc, yc, xt, generator=torch.Generator().manual_seed(seed)
    )
    a, b, c = draw(7), draw(7), draw(8)
    assert a.shape == (3, 5) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_samples_follow_the_model_conditional():
    """Step 0 samples are draws from the first conditional: their mean matches it."""
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, _ = task(b=1, nt=1)
    n = 4000
    samples = predictor.sample_sequence(
        xc.expand(n, -1, -1),
        yc.expand(n, -1),
        xt.expand(n, -1, -1),
        generator=torch.Generator().manual_seed(0),
    )
    grid = torch.linspace(-15, 15, 6001, dtype=torch.float64)
    dens = predictor.evaluate_joint_density(
        xc.expand(grid.numel(), -1, -1),
        yc.expand(grid.numel(), -1),
        xt.expand(grid.numel(), -1, -1),
        grid[:, None],
    )[:, 0].exp()
    step = grid[1] - grid[0]
    mean = (grid * dens).sum() * step
    sd = ((grid - mean) ** 2 * dens).sum().mul(step).sqrt()
    assert abs((dens.sum() * step).item() - 1) < 1e-3  # the conditional is a density
    assert abs(samples.mean().item() - mean.item()) < 5 * sd.item() / n**0.5


def test_empty_context_and_one_target():
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, yt = task(nc=0, nt=1)
    out = predictor.evaluate_joint_density(xc, yc, xt, yt)
    assert out.shape == (3, 1) and torch.isfinite(out).all()
    torch.testing.assert_close(predictor.stepwise_log_density(xc, yc, xt, yt), out)
    assert torch.isfinite(predictor.sample_sequence(xc, yc, xt)).all()


def test_refused_graph_capture_runs_eagerly_and_warns_once(monkeypatch):
    """Where CUDA refuses a capture, the call runs eagerly (same result), with one warning
    naming the error; the next call with these shapes does not try again."""
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, yt = task()
    expect = predictor.evaluate_joint_density(xc, yc, xt, yt)
    tries = []

    def refuse(*args):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(predictor, "_graphs_apply", lambda device: True)
    monkeypatch.setattr("tabpfn_infer.predictor.graphs.Captured", refuse)
    with pytest.warns(RuntimeWarning, match="evaluate_joint_density: CUDA-graph capture failed"):
        got = predictor.evaluate_joint_density(xc, yc, xt, yt)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    torch.testing.assert_close(predictor.evaluate_joint_density(xc, yc, xt, yt), expect)
    assert len(tries) == 1 and predictor.captured_methods == ()


def test_no_targets():
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, yt = task(nt=0)
    assert predictor.sample_sequence(xc, yc, xt).shape == (3, 0)
    assert predictor.evaluate_joint_density(xc, yc, xt, yt).shape == (3, 0)
    assert predictor.stepwise_log_density(xc, yc, xt, yt).shape == (3, 0)
    k = predictor.marginal_mixture(*task()[:3])[0].shape[-1]
    for t in predictor.marginal_mixture(xc, yc, xt):  # empty mixtures, not a reshape error
        assert t.shape == (3, 0, k)
    with pytest.raises(InputError, match="x_target: expected shape"):
        predictor.marginal_mixture(xc, yc, xt[:, :, :1])  # still checked


def test_more_targets_than_buffer_size_wrap_ar_tokens():
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, yt = task(nt=8)  # buffer_size 3
    torch.testing.assert_close(
        predictor.stepwise_log_density(xc, yc, xt, yt),
        predictor.evaluate_joint_density(xc, yc, xt, yt),
    )


def test_bad_input_named():
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, yt = task()
    bad = xc.clone()
    bad[1, 4, 1] = float("nan")
    with pytest.raises(
        InputError, match="x_context: expected finite values, got nan at batch 1, row 4, column 1"
    ):
        predictor.evaluate_joint_density(bad, yc, xt, yt)
    bad_y = yt.clone()
    bad_y[2, 3] = float("inf")
    with pytest.raises(InputError, match=r"y_target: .* at batch 2, row 3"):
        predictor.evaluate_joint_density(xc, yc, xt, bad_y)
    with pytest.raises(InputError, match="x_target: expected shape"):
        predictor.sample_sequence(xc, yc, xt[..., :1])
    with pytest.raises(InputError, match="y_context"):
        predictor.sample_sequence(xc, yc[:, :3], xt)
    with pytest.raises(InputError, match="x_context"):
        predictor.sample_sequence(xc[0], yc, xt)


def test_bad_input_named_with_expanded_context():
    """An expanded (stride 0) context needs no sharing test, so the finiteness flag is read
    after the call is queued: every method still rejects NaN/inf, naming the element."""
    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    xc, yc, xt, yt = task(shared=True)
    assert xc.stride(0) == 0
    bad_xc = xc[:1].clone()
    bad_xc[0, 4, 1] = float("nan")
    with pytest.raises(InputError, match=r"x_context: .* nan at batch 0, row 4, column 1"):
        predictor.sample_sequence(bad_xc.expand_as(xc), yc, xt)
    bad_xt = xt.clone()
    bad_xt[2, 1, 0] = float("-inf")
    with pytest.raises(InputError, match=r"x_target: .* -inf at batch 2, row 1, column 0"):
        predictor.marginal_mixture(xc, yc, bad_xt)
    bad_y = yt.clone()
    bad_y[1, 3] = float("nan")
    for method in (predictor.evaluate_joint_density, predictor.stepwise_log_density):
        with pytest.raises(InputError, match=r"y_target: .* nan at batch 1, row 3"):
            method(xc, yc, xt, bad_y)
    # 1e300 is finite in float64 but overflows the float32 flag: the exact check finds
    # nothing, so no error.
    joint = predictor.evaluate_joint_density(xc, yc, xt, torch.full_like(yt, 1e300))
    assert joint.shape == yt.shape
    # Integer features are always finite (and converted to the model's dtype).
    ints = predictor.evaluate_joint_density(xc.round().long(), yc, xt.round().long(), yt)
    floats = predictor.evaluate_joint_density(xc.round(), yc, xt.round(), yt)
    torch.testing.assert_close(ints, floats)


def test_training_forward_loss_and_gradients():
    model = small_model().train()
    xc, yc, xt, yt = task(nt=6)
    loss = model(xc, yc, xt[:, :3], yt[:, :3], xt, yt, backend="torch")
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        unused = "attn_features.q_proj" in name or "attn_features.k_proj" in name
        # with one token per row the feature attention's softmax is 1: q/k have no effect
        assert (param.grad is None) == unused, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_golden_joint_density(golden, dtype):
    """Golden densities on the GPU, backends torch and auto (the Triton kernels; float32 in
    both bf16x3 and tf32x3 dots). float32: all within 5e-3 nats (dots may run in TF32, as
    the peer's do). bfloat16: the model itself
    rounds, so the kernels' error may be at most 2x that of the same bf16 model run by
    PyTorch (FA3's rule), both against the float64 values."""
    model = peer_model(golden, dtype).cuda()
    for inputs, reference in (("inputs", "ejd_ref64"), ("inputs_distinct", "ejd_distinct_ref64")):
        data = {k: v.cuda() for k, v in golden[inputs].items()}
        errors = {}
        for backend, precision in (("torch", "bf16x3"), ("auto", "bf16x3"), ("auto", "tf32x3")):
            predictor = ARTabPFNPredictor(model, backend=backend, fp32_precision=precision)
            out = predictor.evaluate_joint_density(
                data["x_context"], data["y_context"], data["x_target"], data["y_target"]
            )
            error = (out.double().cpu() - golden["outputs"][reference]).abs().max()
            errors[backend if precision == "bf16x3" else f"{backend} {precision}"] = error
        if dtype == torch.float32:
            assert max(errors.values()) < 5e-3, (reference, errors)
        else:
            assert errors["auto"] <= 2 * errors["torch"] + 1e-2, (reference, errors)
            assert errors["auto tf32x3"] == errors["auto"], "bf16 models ignore fp32_precision"


@pytest.mark.gpu
def test_gpu_chain_rule_and_large_batch():
    model = small_model(dtype=torch.float32).cuda()
    predictor = ARTabPFNPredictor(model)
    xc, yc, xt, yt = (t.float().cuda() for t in task(b=2048, nc=300, nt=6, shared=True))
    joint = predictor.evaluate_joint_density(xc, yc, xt, yt)
    torch.testing.assert_close(
        predictor.stepwise_log_density(xc, yc, xt, yt), joint, rtol=2e-3, atol=2e-3
    )
    samples = predictor.sample_sequence(
        xc, yc, xt, generator=torch.Generator("cuda").manual_seed(0)
    )
    assert samples.shape == (2048, 6) and torch.isfinite(samples).all()


def test_reference_backend_splits_large_calls(monkeypatch):
    """With a tiny score budget every reference call is split; results do not change."""
    from tabpfn_infer.predictor import routing

    predictor = ARTabPFNPredictor(small_model(), backend="torch")
    for shared in (True, False):
        xc, yc, xt, yt = task(b=5, shared=shared)
        want = predictor.evaluate_joint_density(xc, yc, xt, yt)
        want_steps = predictor.stepwise_log_density(xc, yc, xt, yt)
        monkeypatch.setattr(routing, "SCORE_BUDGET", 1)
        torch.testing.assert_close(
            predictor.evaluate_joint_density(xc, yc, xt, yt), want, rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            predictor.stepwise_log_density(xc, yc, xt, yt), want_steps, rtol=1e-12, atol=1e-12
        )
        monkeypatch.undo()


def test_fp32_precision_is_checked_and_scopes_every_call(monkeypatch):
    """The predictor's fp32_precision is the scoped dot precision while its methods run (and
    only then); an unknown one is refused naming the argument."""
    from tabattn_core.precision import scoped_fp32_dot_precision
    from tabpfn_infer.predictor.layers import InferenceBackbone

    with pytest.raises(InputError, match="fp32_precision: expected one of"):
        ARTabPFNPredictor(small_model(), fp32_precision="ieee")
    seen = []
    run_layers = InferenceBackbone.__call__

    def spy(*args, **kwargs):
        seen.append(scoped_fp32_dot_precision())
        return run_layers(*args, **kwargs)

    monkeypatch.setattr(InferenceBackbone, "__call__", spy)
    predictor = ARTabPFNPredictor(small_model(), backend="torch", fp32_precision="tf32")
    xc, yc, xt, yt = task(b=3, nc=9, nt=4, shared=True)
    predictor.evaluate_joint_density(xc, yc, xt, yt)
    predictor.sample_sequence(xc, yc, xt, generator=torch.Generator().manual_seed(0))
    predictor.marginal_mixture(xc, yc, xt)
    assert len(seen) >= 3 and set(seen) == {"tf32"}
    assert scoped_fp32_dot_precision() is None


def test_weight_addresses_follow_every_way_of_replacing_weights():
    """The graphs' staleness key (the parameters' addresses) changes when parameters are
    assigned, a layer is replaced, or a parameter's data moves; importing the predictor
    installs no process-wide module hooks."""
    model = small_model()
    predictor = ARTabPFNPredictor(model)
    seen = [predictor._weight_addresses()]
    assert seen[0] == predictor._weight_addresses()  # unchanged: same key
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    seen.append(predictor._weight_addresses())
    model.backbone.layers[0] = copy.deepcopy(model.backbone.layers[-1])
    seen.append(predictor._weight_addresses())
    for param in model.parameters():
        param.data = param.data.clone()
    seen.append(predictor._weight_addresses())
    assert len(set(seen)) == len(seen)
    assert seen[-1] == tuple(p.data_ptr() for p in model.parameters())
    module = torch.nn.modules.module
    hooks = [
        *module._global_parameter_registration_hooks.values(),
        *module._global_module_registration_hooks.values(),
    ]
    assert not [h for h in hooks if h.__module__.startswith("tabpfn_infer")]


@pytest.mark.gpu
def test_gpu_cuda_graphs_match_eager():
    """Calls replayed from CUDA graphs (decode steps: one graph, step index on the device)
    give the eager calls' densities and samples; a second call with new values of the same
    shapes reads its own inputs, and new shapes capture anew."""
    model = small_model(dtype=torch.float32).cuda()
    graphed = ARTabPFNPredictor(model, backend="triton", cuda_graph=True)
    eager = ARTabPFNPredictor(model, backend="triton", cuda_graph=False)
    for seed, (b, nc, nt) in enumerate([(64, 50, 7), (64, 50, 7), (5, 33, 3)]):
        xc, yc, xt, yt = (t.float().cuda() for t in task(b=b, nc=nc, nt=nt, shared=True, seed=seed))
        for method in ("stepwise_log_density", "evaluate_joint_density"):
            torch.testing.assert_close(
                getattr(graphed, method)(xc, yc, xt, yt),
                getattr(eager, method)(xc, yc, xt, yt),
                rtol=1e-4,
                atol=1e-4,
            )
        draws = [
            p.sample_sequence(xc, yc, xt, generator=torch.Generator("cuda").manual_seed(seed))
            for p in (graphed, eager)
        ]
        assert torch.isfinite(draws[0]).all()
        torch.testing.assert_close(draws[0], draws[1], rtol=1e-3, atol=1e-3)
    assert set(graphed.captured_methods) == {
        "sample_sequence",
        "stepwise_log_density",
        "evaluate_joint_density",
    }
    graphed.release_graphs()
    assert graphed.captured_methods == ()


@pytest.mark.gpu
def test_gpu_cuda_graphs_follow_reallocated_weights():
    """Graphs read the weights in place: updated in place they are seen, and a model whose
    parameters were reallocated is captured anew (no stale addresses)."""
    model = small_model(dtype=torch.float32).cuda()
    graphed = ARTabPFNPredictor(model, backend="triton", cuda_graph=True)
    eager = ARTabPFNPredictor(model, backend="triton", cuda_graph=False)
    xc, yc, xt, yt = (t.float().cuda() for t in task(b=16, nc=40, nt=5, shared=True))
    graphed.evaluate_joint_density(xc, yc, xt, yt)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # in place
    torch.testing.assert_close(
        graphed.evaluate_joint_density(xc, yc, xt, yt),
        eager.evaluate_joint_density(xc, yc, xt, yt),
        rtol=1e-4,
        atol=1e-4,
    )
    for p in model.parameters():
        p.data = p.data * 0.99  # reallocated
    torch.testing.assert_close(
        graphed.evaluate_joint_density(xc, yc, xt, yt),
        eager.evaluate_joint_density(xc, yc, xt, yt),
        rtol=1e-4,
        atol=1e-4,
    )


def all_outputs(predictor, xc, yc, xt, yt):
    """Joint density, stepwise density and the marginal mixture, concatenated: [B, *]."""
    return torch.cat(
        [
            predictor.evaluate_joint_density(xc, yc, xt, yt),
            predictor.stepwise_log_density(xc, yc, xt, yt),
            *(t.flatten(1) for t in predictor.marginal_mixture(xc, yc, xt)),
        ],
        1,
    )


@pytest.fixture
def forced_selection(monkeypatch):
    """`context_top_k` always through the selection (its measured dense fallback off)."""
    import tabpfn_infer.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "DENSE_CONTEXT_BELOW", 0)
    monkeypatch.setattr(predictor_module, "DENSE_CONTEXT_FRACTION", float("inf"))


@pytest.mark.usefixtures("forced_selection")
@pytest.mark.parametrize("shared", [False, True])
def test_context_top_k_of_all_blocks_is_exact(shared):
    """Selecting every context block (37 rows in blocks of 8: 5, the last short) and merging
    with the exact buffer part gives the dense densities, stepwise densities and marginals."""
    model = small_model()
    xc, yc, xt, yt = task(nc=37, shared=shared)
    dense = all_outputs(ARTabPFNPredictor(model, backend="torch"), xc, yc, xt, yt)
    for top_k in (5, 6):
        top = ARTabPFNPredictor(model, backend="torch", context_top_k=top_k, context_block_size=8)
        torch.testing.assert_close(all_outputs(top, xc, yc, xt, yt), dense, rtol=0, atol=1e-10)


@pytest.mark.usefixtures("forced_selection")
@pytest.mark.parametrize("shared", [False, True])
def test_context_top_k_changes_results_and_keeps_the_chain_rule(shared, monkeypatch):
    """One block of 8 of 37 context rows: finite results that differ from the dense ones;
    decoding and teacher forcing select the same blocks for a row, so the stepwise densities
    still equal the joint ones; the reference's split calls change nothing."""
    from tabpfn_infer.predictor import routing

    model = small_model()
    xc, yc, xt, yt = task(nc=37, shared=shared)
    top = ARTabPFNPredictor(model, backend="torch", context_top_k=1, context_block_size=8)
    joint = top.evaluate_joint_density(xc, yc, xt, yt)
    dense = ARTabPFNPredictor(model, backend="torch").evaluate_joint_density(xc, yc, xt, yt)
    assert torch.isfinite(joint).all()
    assert (joint - dense).abs().max() > 1e-3
    torch.testing.assert_close(
        top.stepwise_log_density(xc, yc, xt, yt), joint, rtol=1e-10, atol=1e-10
    )
    marginals = torch.cat(top.marginal_mixture(xc, yc, xt), -1)
    assert torch.isfinite(marginals).all()
    samples = top.sample_sequence(xc, yc, xt, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 5) and torch.isfinite(samples).all()
    monkeypatch.setattr(routing, "SCORE_BUDGET", 1)
    torch.testing.assert_close(
        top.evaluate_joint_density(xc, yc, xt, yt), joint, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        torch.cat(top.marginal_mixture(xc, yc, xt), -1), marginals, rtol=1e-12, atol=1e-12
    )


@pytest.mark.usefixtures("forced_selection")
def test_context_top_k_with_an_empty_context():
    model = small_model()
    xc, yc, xt, yt = task(nc=0, nt=3)
    top = ARTabPFNPredictor(model, backend="torch", context_top_k=2, context_block_size=4)
    dense = ARTabPFNPredictor(model, backend="torch")
    torch.testing.assert_close(
        all_outputs(top, xc, yc, xt, yt), all_outputs(dense, xc, yc, xt, yt), rtol=0, atol=1e-10
    )


@pytest.mark.parametrize(
    "below, fraction, dense",
    [
        (38, float("inf"), True),  # 37 context rows < 38
        (37, float("inf"), False),
        (0, 8 / 37, True),  # one block of 8 covers 8/37 of the context
        (0, 8 / 37 + 1e-9, False),
    ],
)
def test_context_top_k_dense_below_the_measured_crossover(monkeypatch, below, fraction, dense):
    """Contexts shorter than DENSE_CONTEXT_BELOW, or covered to DENSE_CONTEXT_FRACTION by the
    k blocks, run the op of the predictor without top-k: densities, stepwise densities,
    marginals and samples equal to the last bit; otherwise the selection (results differ)."""
    import tabpfn_infer.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "DENSE_CONTEXT_BELOW", below)
    monkeypatch.setattr(predictor_module, "DENSE_CONTEXT_FRACTION", fraction)
    model = small_model()
    xc, yc, xt, yt = task(nc=37, shared=True)
    exact = ARTabPFNPredictor(model, backend="torch")
    top = ARTabPFNPredictor(model, backend="torch", context_top_k=1, context_block_size=8)
    got, want = all_outputs(top, xc, yc, xt, yt), all_outputs(exact, xc, yc, xt, yt)
    samples = [
        p.sample_sequence(xc, yc, xt, generator=torch.Generator().manual_seed(0))
        for p in (top, exact)
    ]
    assert torch.equal(got, want) == dense
    if dense:
        assert torch.equal(*samples)
    else:
        assert (got - want).abs().max() > 1e-3


def test_context_top_k_decision_logged_once(monkeypatch, caplog):
    """Each op's first decision either way is logged once (logger "tabattn"), naming the
    context length and the constants."""
    import logging

    import tabpfn_infer.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "_said", LogOnce())
    monkeypatch.setattr(predictor_module, "DENSE_CONTEXT_BELOW", 38)
    model = small_model()
    xc, yc, xt, yt = task(nc=37, shared=True)
    top = ARTabPFNPredictor(model, backend="torch", context_top_k=1, context_block_size=8)
    with caplog.at_level(logging.INFO, logger="tabattn"):
        for _ in range(2):
            top.evaluate_joint_density(xc, yc, xt, yt)
            top.stepwise_log_density(xc, yc, xt, yt)
        monkeypatch.setattr(predictor_module, "DENSE_CONTEXT_BELOW", 37)
        top.evaluate_joint_density(xc, yc, xt, yt)
        top.evaluate_joint_density(xc, yc, xt, yt)
    said = [r.getMessage() for r in caplog.records if "context_top_k" in r.getMessage()]
    assert len(said) == 3, said
    assert "teacher_forcing_attention runs exact dense attention" in said[0]
    assert "over 37 context rows" in said[0] and "DENSE_CONTEXT_BELOW=38" in said[0]
    assert "shared_context_attention runs exact dense attention" in said[1]
    assert "teacher_forcing_attention runs selection attention" in said[2]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"context_top_k": 0}, "context_top_k"),
        ({"context_top_k": -2}, "context_top_k"),
        ({"context_top_k": 2.0}, "context_top_k"),
        ({"context_top_k": True}, "context_top_k"),
        ({"context_top_k": 4, "context_block_size": 0}, "context_block_size"),
        ({"context_block_size": -1}, "context_block_size"),
        ({"context_block_size": 16.0}, "context_block_size"),
    ],
)
def test_context_top_k_bad_values_named(kwargs, name):
    with pytest.raises(InputError, match=f"{name}: expected a positive int, got"):
        ARTabPFNPredictor(small_model(), backend="torch", **kwargs)


@pytest.mark.usefixtures("forced_selection")
def test_estimator_passes_context_top_k():
    from tabpfn_infer.estimator import ARTabPFNRegressor

    xc, yc, xt, yt = task(b=1, nc=37, nt=4)
    make = lambda **kw: ARTabPFNRegressor(
        model=small_model(), backend="torch", device="cpu", dtype=torch.float64, **kw
    ).fit(xc[0], yc[0])
    dense, top = make(), make(context_top_k=1, context_block_size=8)
    assert top.predictor_.context_top_k == 1 and top.predictor_.context_block_size == 8
    a, b = dense.log_density(xt[0], yt[0]), top.log_density(xt[0], yt[0])
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-3
    with pytest.raises(InputError, match="context_top_k"):
        make(context_top_k=0)


@pytest.mark.gpu
@pytest.mark.usefixtures("forced_selection")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_gpu_context_top_k(backend):
    """float32 on the GPU, 1000 context rows in 16 blocks of 64: all 16 blocks match the
    dense path; 4 blocks keep the chain rule (decoding eagerly, without the CUDA graph) and
    match the same selection run in float64 on the CPU (on CPU, float32 is within 3e-6 of it,
    the dense path 0.15 away)."""
    model = small_model(dtype=torch.float32).cuda()
    task64 = task(b=64, nc=1000, nt=6, shared=True)
    gpu = [t.float().cuda() for t in task64]
    dense = ARTabPFNPredictor(model, backend=backend).evaluate_joint_density(*gpu)
    every = ARTabPFNPredictor(model, backend=backend, context_top_k=16)
    torch.testing.assert_close(every.evaluate_joint_density(*gpu), dense, rtol=5e-3, atol=5e-3)
    top = ARTabPFNPredictor(model, backend=backend, context_top_k=4)
    joint = top.evaluate_joint_density(*gpu)
    assert torch.isfinite(joint).all()
    torch.testing.assert_close(top.stepwise_log_density(*gpu), joint, rtol=5e-3, atol=5e-3)
    assert torch.isfinite(torch.cat(top.marginal_mixture(*gpu[:3]), -1)).all()
    cpu64 = ARTabPFNPredictor(small_model(), backend="torch", context_top_k=4)
    want = cpu64.evaluate_joint_density(*task64)
    assert (joint.double().cpu() - want).abs().max() < 2e-2
