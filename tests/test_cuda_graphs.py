"""The training step as a CUDA graph: when it is used (pure logic, tested on CPU) and that
a replayed step computes what the eager step computes (needs CUDA: skipped without it,
run on a GPU machine by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core import config as cfgmod
from core.config import LAYER_GROUPS
from core.engine.data import ImageSet, Preprocess, apply_crop_flip, augment_batch, draw_crop_flip
from core.engine.model import build_resnet18, frozen_prefix, set_trainable
from core.engine.train import (
    CUDA_GRAPHS_ENV,
    GRAPH_WARMUP_STEPS,
    Runtime,
    StepGraph,
    compute_features,
    cuda_graphs_enabled,
    cuda_runtime,
    graph_step_applies,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)

CPU = torch.device("cpu")
GPU = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graphs_only_for_full_batches_on_cuda_with_data_on_the_gpu():
    on = cuda_runtime(GPU, bf16_supported=True)
    assert on.cuda_graphs
    assert graph_step_applies(on, inputs_on_device=True, batch_len=128, batch_size=128)
    # A ragged last batch has other shapes than the captured step: eager.
    assert not graph_step_applies(on, inputs_on_device=True, batch_len=77, batch_size=128)
    # Data in pinned host memory (too large for the GPU): the gather is host work.
    assert not graph_step_applies(on, inputs_on_device=False, batch_len=128, batch_size=128)
    off = cuda_runtime(GPU, bf16_supported=True, graphs=False)
    assert not off.cuda_graphs
    assert not graph_step_applies(off, inputs_on_device=True, batch_len=128, batch_size=128)
    # Never on the CPU, whatever the flag says.
    assert not graph_step_applies(Runtime(CPU, cuda_graphs=True), True, 128, 128)


def test_cuda_graphs_opt_out_by_environment(monkeypatch):
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    assert cuda_graphs_enabled()
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "0")
    assert not cuda_graphs_enabled()
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "1")
    assert cuda_graphs_enabled()
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "off")
    with pytest.raises(ValueError, match=CUDA_GRAPHS_ENV):
        cuda_graphs_enabled()


def test_augmentation_drawn_per_epoch_equals_per_batch():
    """train_one_epoch draws an epoch's crops and flips up front: the same numbers, in the
    same generator order, as augment_batch drawing batch by batch."""
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)
    per_batch = [augment_batch(x[:6], g), augment_batch(x[6:], g)]
    g = torch.Generator().manual_seed(5)
    drawn = torch.cat([draw_crop_flip(6, 4, g), draw_crop_flip(4, 4, g)], 1)
    assert torch.equal(apply_crop_flip(x[:6], drawn[:, :6], 4), per_batch[0])
    assert torch.equal(apply_crop_flip(x[6:], drawn[:, 6:], 4), per_batch[1])


def test_step_graph_is_inert_on_cpu():
    """On CPU the holder never captures: every step is eager, results as without it."""
    torch.manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8),
                    torch.arange(20) % 3, ["a", "b", "c"])
    results = []
    for holder in (None, StepGraph()):
        torch.manual_seed(0)
        model = build_resnet18(3)
        set_trainable(model, ("layer4", "fc"))
        stage = cfgmod.StageConfig(groups=("layer4", "fc"), lr=0.01)
        opt = make_optimizer(model, stage)
        m = train_one_epoch(model, data, Preprocess(32), Runtime(CPU, cuda_graphs=True), opt,
                            make_scheduler(opt, stage, 10), stage.groups, "eval", 4, True,
                            torch.Generator().manual_seed(0), lambda *a: None, lambda: False,
                            step_graph=holder)
        results.append((m.loss, m.acc, model.fc.weight.detach().clone()))
        if holder is not None:
            assert holder.graph is None and holder.eager_steps == 0
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]
    assert torch.equal(results[0][2], results[1][2])


# ---------------------------------------------------------------- on the GPU


def _bn_stats(model: nn.Module) -> torch.Tensor:
    return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in model.modules()
                      if isinstance(m, nn.BatchNorm2d)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _train(graphs: bool, groups, cached: bool, epochs: int = 2, n: int = 1000, batch: int = 128):
    """`epochs` epochs from the same weights, data and seed; the last batch is ragged
    (1000 = 7 x 128 + 104), so both the replay and the eager fallback run."""
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(GPU),
                    torch.randint(0, 10, (n,), generator=g).to(GPU), [str(i) for i in range(10)])
    rt = cuda_runtime(GPU, torch.cuda.is_bf16_supported(), graphs=graphs)
    pre = Preprocess(32)
    torch.manual_seed(0)
    model = build_resnet18(10).to(GPU).to(memory_format=torch.channels_last)
    set_trainable(model, groups)
    stage = cfgmod.StageConfig(groups=tuple(groups), lr=0.05, schedule="cosine", epochs=epochs)
    opt = make_optimizer(model, stage, fused=True)
    sched = make_scheduler(opt, stage, 8)
    feats = compute_features(model, data, frozen_prefix(groups), pre, rt) if cached else None
    holder, gen, losses, metrics = StepGraph(), torch.Generator().manual_seed(0), [], []
    for _ in range(epochs):
        metrics.append(train_one_epoch(model, data, pre, rt, opt, sched, tuple(groups), "eval",
                                       batch, not cached, gen, lambda i, loss, lr: losses.append(float(loss)),
                                       lambda: False, feats, holder))
    torch.cuda.synchronize()
    return model, torch.tensor(losses), metrics, holder


@needs_cuda
@pytest.mark.parametrize("groups,cached", [(("layer4", "fc"), False), (LAYER_GROUPS, False),
                                           (("layer3", "layer4", "fc"), True)])
def test_graphed_step_matches_the_eager_step(groups, cached):
    eager_model, eager_losses, eager_m, eager_holder = _train(False, groups, cached)
    graph_model, graph_losses, graph_m, holder = _train(True, groups, cached)
    assert eager_holder.graph is None
    assert holder.graph is not None and holder.eager_steps == GRAPH_WARMUP_STEPS  # captured once
    assert len(graph_losses) == len(eager_losses) == 16
    # bf16 autocast: the same kernels on the same inputs; cudnn may pick other algorithms
    # between the two runs, so allow bf16-level differences, growing over 16 steps.
    assert torch.isfinite(graph_losses).all()
    weights = max(_rel(p, q) for p, q in zip(graph_model.parameters(), eager_model.parameters()))
    print(f"graphed vs eager, {groups}, cached={cached}: losses rel {_rel(graph_losses, eager_losses):.2e}, "
          f"worst parameter rel {weights:.2e}, BN statistics rel "
          f"{_rel(_bn_stats(graph_model), _bn_stats(eager_model)):.2e}")
    assert _rel(graph_losses, eager_losses) < 2e-2, (graph_losses, eager_losses)
    for a, b in zip(graph_m, eager_m):
        assert a.images == b.images == 1000
        assert a.loss == pytest.approx(b.loss, rel=2e-2)
        assert a.acc == pytest.approx(b.acc, abs=0.03)
    for (name, p), q in zip(graph_model.named_parameters(), eager_model.parameters()):
        assert _rel(p, q) < 2e-2, name
    assert _rel(_bn_stats(graph_model), _bn_stats(eager_model)) < 2e-2
    # The replayed steps really trained: the weights moved as far as the eager ones did.
    torch.manual_seed(0)
    start = build_resnet18(10).to(GPU)
    moved_e = sum((p - q).norm() for p, q in zip(eager_model.fc.parameters(), start.fc.parameters()))
    moved_g = sum((p - q).norm() for p, q in zip(graph_model.fc.parameters(), start.fc.parameters()))
    assert moved_g.item() == pytest.approx(moved_e.item(), rel=2e-2)


@needs_cuda
def test_graphed_step_with_moving_prefix_statistics():
    """BN policy "train" in the frozen prefix (its running statistics move inside the
    graph, no folding); no ragged batch: 2 epochs of 4 full batches, captured at step 4."""
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build_resnet18(10).to(GPU).to(memory_format=torch.channels_last)
        groups = ("layer4", "fc")
        set_trainable(model, groups)
        stage = cfgmod.StageConfig(groups=groups, lr=0.05, bn_policy="train")
        opt = make_optimizer(model, stage, fused=True)
        sched = make_scheduler(opt, stage, 4)
        g = torch.Generator().manual_seed(1)
        data = ImageSet(torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g).to(GPU),
                        torch.randint(0, 10, (512,), generator=g).to(GPU), [str(i) for i in range(10)])
        rt = cuda_runtime(GPU, torch.cuda.is_bf16_supported(), graphs=graphs)
        holder, gen = StepGraph(), torch.Generator().manual_seed(0)
        for _ in range(2):
            train_one_epoch(model, data, Preprocess(32), rt, opt, sched, groups, "train", 128, True,
                            gen, lambda *a: None, lambda: False, None, holder)
        torch.cuda.synchronize()
        results.append((copy.deepcopy(model), holder))
    (eager, _), (graphed, holder) = results
    assert holder.graph is not None
    print(f"graphed vs eager, prefix BN training: BN statistics rel "
          f"{_rel(_bn_stats(graphed), _bn_stats(eager)):.2e}, fc rel {_rel(graphed.fc.weight, eager.fc.weight):.2e}")
    assert _rel(_bn_stats(graphed), _bn_stats(eager)) < 2e-2
    assert _rel(graphed.fc.weight, eager.fc.weight) < 2e-2
