"""Where the CPU time goes at 32x32, and which levers pay: for the runtime a CPU *without*
bf16 gets (forced here with FINETUNE_LAB_CPU_BF16=0 unless `--bf16`).

    python -m benchmarks.cpu_levers [--bf16] [--images N] [--rounds R] [--batches B]
                                    [--skip compile,int8,profile]

1. Profile: per layer group, forward and backward milliseconds of one training step of
   stage 1 (layer4+fc), stage 2 (+layer3) and all layers (the frozen prefix, the optimizer
   step and the batch preparation too), from timestamps taken at group boundaries (the
   backward ones by gradient hooks), median of the measured steps; plus torch.profiler's
   top operators for the all-layers step.
2. Levers, interleaved round by round in this one process (other load hits every variant
   alike), images/s of the real `train_one_epoch`: the default runtime; channels-last for
   the trained layers; the frozen prefix contiguous instead of channels-last; batch 256;
   one thread instead of one per core.
3. torch.compile (inductor): compile seconds and steady ms/step of the trained suffix, and
   of the frozen prefix for inference (conv+bias+ReLU fused, weights frozen), against eager.
4. int8 (x86/oneDNN, VNNI where the CPU has it) for the frozen prefix conv1..layer3: ms per
   batch and the error of its output against fp32.

Ratios and spreads are what to read: the machine may be shared. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.summary import emit_summary
from benchmarks.throughput import DEFAULT_DATA, STAGES, cpu_model, folder_listing, load_ours, log
from core import config as cfgmod
from core.config import LAYER_GROUPS
from core.engine.data import ImageSet, Preprocess, augment_batch
from core.engine.model import (
    FoldedPrefix,
    build_resnet18,
    forward_group,
    frozen_prefix,
    physical_cores,
    set_train_mode,
    set_trainable,
)
from core.engine.train import (
    CPU_BF16_ENV,
    PrefixRunner,
    Runtime,
    cpu_flags,
    cpu_has_native_bf16,
    default_runtime,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)

CPU = torch.device("cpu")


def _model(groups, runtime: Runtime, seed=0):
    torch.manual_seed(seed)
    m = build_resnet18(10)
    if runtime.channels_last:
        m.to(memory_format=torch.channels_last)
    set_trainable(m, groups)
    stage = cfgmod.StageConfig(groups=tuple(groups), epochs=1, lr=0.01, schedule="constant")
    opt = make_optimizer(m, stage, fused=runtime.fused_optimizer)
    return m, opt, make_scheduler(opt, stage, 10**6)


# ---------------------------------------------------------------- 1. profile


def profile_step(data: ImageSet, groups, runtime: Runtime, pre: Preprocess, batch: int,
                 steps: int) -> dict[str, float]:
    """Median milliseconds per part of one training step: 'prepare' (index, augment,
    normalise), 'prefix' (frozen groups, no autograd), '<group> fwd', '<group> bwd', 'step'."""
    model, opt, _ = _model(groups, runtime)
    set_train_mode(model, groups, "eval")
    prefix = frozen_prefix(groups)
    runner = PrefixRunner(model, prefix, "eval", runtime, pre)
    trained = [g for g in LAYER_GROUPS if g not in prefix]
    g = torch.Generator().manual_seed(0)
    rows: dict[str, list[float]] = {}
    for s in range(steps + 2):  # two warm-up steps
        t = {}
        t0 = time.perf_counter()
        idx = torch.randint(0, len(data), (batch,), generator=g)
        xb = augment_batch(data.images[idx], g)
        y = data.labels[idx]
        if prefix:
            t1 = time.perf_counter()
            x = runner(xb)
        else:
            t1 = None
            x = runner(xb)
        t2 = time.perf_counter()
        if runtime.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        marks = {}
        with runtime.autocast():
            for grp in trained:
                a = time.perf_counter()
                x = forward_group(model, grp, x)
                t[f"{grp} fwd"] = time.perf_counter() - a
                if x.requires_grad:
                    x.register_hook(lambda grad, grp=grp: marks.__setitem__(grp, time.perf_counter()))
            loss = F.cross_entropy(x.float(), y)
        opt.zero_grad(set_to_none=True)
        b0 = time.perf_counter()
        loss.backward()
        b1 = time.perf_counter()
        # Gradient w.r.t. group k's output arrives at marks[k]; its backward ends when the
        # gradient of the group before it arrives (or backward returns, for the first).
        for i, grp in enumerate(trained):
            end = marks[trained[i - 1]] if i > 0 else b1
            t[f"{grp} bwd"] = end - marks.get(grp, b0)
        opt.step()
        t["step"] = time.perf_counter() - b1
        t["prepare"] = ((t1 or t2) - t0) if prefix else (t2 - t0)
        if prefix:
            t["prefix"] = t2 - t1
        if s >= 2:
            for k, v in t.items():
                rows.setdefault(k, []).append(v * 1000)
    return {k: statistics.median(v) for k, v in rows.items()}


def interleaved_ms(first, second, steps: int) -> tuple[float, float]:
    """Median milliseconds of `first()` and `second()` over `steps` rounds, alternating them
    in each round so other load on the machine hits both alike."""
    a_ms, b_ms = [], []
    for _ in range(steps):
        a = time.perf_counter()
        first()
        b = time.perf_counter()
        second()
        c = time.perf_counter()
        a_ms.append((b - a) * 1000)
        b_ms.append((c - b) * 1000)
    return statistics.median(a_ms), statistics.median(b_ms)


def profiler_top(data: ImageSet, groups, runtime: Runtime, pre: Preprocess, batch: int,
                 top: int = 14) -> str:
    from torch.profiler import ProfilerActivity, profile

    model, opt, sched = _model(groups, runtime)
    sub = data.subset(torch.arange(batch * 3))
    train_one_epoch(model, sub, pre, runtime, opt, sched, groups, "eval", batch, True,
                    torch.Generator().manual_seed(0), lambda *a: None, lambda: False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_one_epoch(model, sub, pre, runtime, opt, sched, groups, "eval", batch, True,
                        torch.Generator().manual_seed(1), lambda *a: None, lambda: False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ---------------------------------------------------------------- 2. levers


class Variant:
    def __init__(self, name, data, groups, runtime, pre, batch=128, threads=0):
        self.name, self.data, self.groups, self.runtime, self.pre = name, data, groups, runtime, pre
        self.batch, self.threads = batch, threads
        self.model, self.opt, self.sched = _model(groups, runtime)
        self.gen = torch.Generator().manual_seed(0)

    def window(self, images: int, seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(self.data), generator=g)[:images]
        sub = self.data.subset(pick)
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            m = train_one_epoch(self.model, sub, self.pre, self.runtime, self.opt, self.sched,
                                self.groups, "eval", self.batch, True, self.gen,
                                lambda *a: None, lambda: False)
        finally:
            torch.set_num_threads(before)
        return m.images / m.seconds


# ---------------------------------------------------------------- 3. torch.compile


def compile_suffix(data: ImageSet, groups, runtime: Runtime, pre: Preprocess, steps: int
                   ) -> dict[str, float]:
    """Seconds of the first compiled step and median ms/step eager vs compiled, interleaved."""
    from core.engine.model import forward_suffix

    model, opt, _ = _model(groups, runtime)
    set_train_mode(model, groups, "eval")
    prefix = frozen_prefix(groups)
    runner = PrefixRunner(model, prefix, "eval", runtime, pre)

    def step_fn(x, y):
        with runtime.autocast():
            return F.cross_entropy(forward_suffix(model, x, prefix).float(), y)

    compiled = torch.compile(step_fn)
    g = torch.Generator().manual_seed(0)

    def one(fn):
        idx = torch.randint(0, len(data), (128,), generator=g)
        x, y = runner(augment_batch(data.images[idx], g)), data.labels[idx]
        t0 = time.perf_counter()
        loss = fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    one(compiled)
    first = time.perf_counter() - t0
    one(compiled), one(step_fn)
    eager, comp = [], []
    for _ in range(steps):
        eager.append(one(step_fn) * 1000)
        comp.append(one(compiled) * 1000)
    return {"first_step_s": first, "eager_ms": statistics.median(eager),
            "compiled_ms": statistics.median(comp)}


def compile_prefix(data: ImageSet, runtime: Runtime, pre: Preprocess, steps: int) -> dict[str, float]:
    """The frozen prefix conv1..layer3 (stage 1's) for inference: eager FoldedPrefix vs
    torch.compile with inductor's weight freezing (fuses conv+bias+ReLU into one call)."""
    import torch._inductor.config as icfg

    model = build_resnet18(10).eval()
    prefix = frozen_prefix(STAGES["stage1"])
    runner = PrefixRunner(model, prefix, "eval", runtime, pre)
    folded = runner.folded
    icfg.freezing = True
    try:
        compiled = torch.compile(folded)
        x = runtime.prepare(data.images[:128], pre, channels_last=runtime.frozen_channels_last)
        with torch.no_grad(), runtime.frozen_autocast():
            t0 = time.perf_counter()
            compiled(x)
            first = time.perf_counter() - t0
            err = (compiled(x).float() - folded(x).float()).abs().max().item()
            eager_ms, compiled_ms = interleaved_ms(lambda: folded(x), lambda: compiled(x), steps)
    finally:
        icfg.freezing = False
    return {"first_call_s": first, "eager_ms": eager_ms, "compiled_ms": compiled_ms,
            "max_abs_diff": err}


# ---------------------------------------------------------------- 4. int8 prefix


def quantize_prefix(model, calibration: list[torch.Tensor]):
    """conv1..layer3 of `model` (eval mode) as a post-training static int8 module (FX graph
    mode, the 'x86' qconfig: oneDNN/fbgemm, VNNI where present), calibrated on the given
    normalised batches; fp32 in and out."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    body = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                               model.layer1, model.layer2, model.layer3).eval()
    prepared = prepare_fx(copy.deepcopy(body), get_default_qconfig_mapping("x86"), (calibration[0],))
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return convert_fx(prepared)


def int8_accuracy(backbone: Path, data_root: Path, images: int, epochs: int) -> dict[str, float]:
    """Does an int8 frozen prefix keep accuracy? Stage 1 (layer4+fc) of the transfer task of
    benchmarks/time_to_accuracy.py, trained on the prefix's outputs computed once in fp32
    or in int8 (same weights, seed and data order); best validation accuracy of each."""
    from benchmarks.time_to_accuracy import FINETUNE_CLASSES, SEED, VAL_FRACTION
    from core.engine.data import load_splits
    from core.engine.model import build_model, forward_suffix
    from core.engine.train import compute_features

    pre = Preprocess(32)
    splits = load_splits("folder", str(data_root), pre, FINETUNE_CLASSES, VAL_FRACTION,
                         max_train_images=images, seed=SEED,
                         cache_dir=Path.home() / ".cache" / "finetune-lab-bench" / "decoded")
    torch.manual_seed(SEED)
    base = build_model(len(FINETUNE_CLASSES), "file", str(backbone)).model
    base.eval()
    prefix = frozen_prefix(STAGES["stage1"])
    fp32 = Runtime(CPU)

    def batches(imgs):
        return [pre.normalize(imgs[i:i + 512]) for i in range(0, len(imgs), 512)]

    feats = {"fp32": (compute_features(base, splits.train, prefix, pre, fp32),
                      compute_features(base, splits.val, prefix, pre, fp32))}
    t0 = time.perf_counter()
    q = quantize_prefix(base, batches(splits.train.images[:1024]))
    quant_s = time.perf_counter() - t0
    with torch.no_grad():
        feats["int8"] = (torch.cat([q(x) for x in batches(splits.train.images)]),
                         torch.cat([q(x) for x in batches(splits.val.images)]))
    out = {"quantize_s": quant_s, "feature_rel_error": (
        (feats["int8"][1] - feats["fp32"][1]).norm() / feats["fp32"][1].norm()).item()}
    for name, (tr, va) in feats.items():
        model = copy.deepcopy(base)
        set_trainable(model, STAGES["stage1"])
        stage = cfgmod.StageConfig(groups=STAGES["stage1"], epochs=epochs, lr=0.01, schedule="cosine")
        opt = make_optimizer(model, stage, fused=True)
        sched = make_scheduler(opt, stage, -(-len(tr) // 128))
        gen = torch.Generator().manual_seed(SEED)
        best = 0.0
        for _ in range(epochs):
            train_one_epoch(model, splits.train, pre, fp32, opt, sched, STAGES["stage1"], "eval",
                            128, False, gen, lambda *a: None, lambda: False, tr)
            model.eval()
            with torch.no_grad():
                pred = forward_suffix(model, va, prefix).argmax(1)
            best = max(best, (pred == splits.val.labels).float().mean().item())
        out[f"val_acc_{name}"] = best
    return out


def int8_prefix(data: ImageSet, runtime: Runtime, pre: Preprocess, steps: int) -> dict[str, float]:
    """Post-training static int8 (FX graph mode, the 'x86' qconfig: oneDNN/fbgemm, VNNI
    where present) of conv1..layer3, calibrated on 8 batches. Random weights here: the
    output error is what matters for the speed decision; accuracy needs trained weights."""
    model = build_resnet18(10).eval()
    # Non-trivial BN statistics: one pass in train mode over real images.
    model.train()
    with torch.no_grad():
        model(pre.normalize(data.images[:512]))
    model.eval()
    folded = FoldedPrefix(model, frozen_prefix(STAGES["stage1"]))
    x = pre.normalize(data.images[:128])
    q = quantize_prefix(model, [pre.normalize(data.images[128 * (i + 1):128 * (i + 2)])
                                for i in range(8)])
    with torch.no_grad():
        ref = folded(x)
        out = q(x)
        rel = ((out - ref).norm() / ref.norm()).item()
        cos = F.cosine_similarity(out.flatten(1), ref.flatten(1)).mean().item()
        xc = x.contiguous(memory_format=torch.channels_last)
        for _ in range(2):
            folded(xc), q(x)
        f32_ms, i8_ms = interleaved_ms(lambda: folded(xc), lambda: q(x), steps)
    return {"fp32_folded_ms": f32_ms, "int8_ms": i8_ms, "rel_error": rel, "mean_cosine": cos}


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_levers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", action="store_true", help="keep bf16 detection (default: force fp32)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=6, help="batches of 128 per timed window")
    ap.add_argument("--steps", type=int, default=5, help="steps per profile / compile measure")
    ap.add_argument("--skip", default="", help="comma list of: profile,levers,compile,int8")
    ap.add_argument("--int8-accuracy", default="", metavar="BACKBONE",
                    help="also check int8's accuracy on the transfer task from this backbone "
                         "(benchmarks/time_to_accuracy.py caches one in ~/.cache/finetune-lab-bench)")
    args = ap.parse_args(argv)
    if not args.bf16:
        os.environ[CPU_BF16_ENV] = "0"
    skip = set(filter(None, args.skip.split(",")))
    threads = physical_cores()
    torch.set_num_threads(threads)
    pre = Preprocess(32)
    runtime = default_runtime(CPU)
    flags = cpu_flags()
    log(f"machine: {cpu_model()}, torch threads {threads}, torch {torch.__version__}; "
        f"bf16 in hardware: {bool({'avx512_bf16', 'amx_bf16'} & flags)}, used: "
        f"{cpu_has_native_bf16()} (${CPU_BF16_ENV}={os.environ.get(CPU_BF16_ENV, 'unset')}); "
        f"VNNI: {bool({'avx512_vnni', 'avx_vnni'} & flags)}")
    log(f"runtime: {runtime}")
    names, paths, labels, _ = folder_listing(Path(args.data).expanduser() / "train",
                                             args.images, seed=0)
    images, labels_t, _ = load_ours(None, (paths, labels), pre)
    data = ImageSet(images, labels_t, names)
    out: dict = {"machine": cpu_model(), "bf16": cpu_has_native_bf16(), "threads": threads}

    if "profile" not in skip:
        log("\n== 1. Milliseconds per part of one step (batch 128, median) ==")
        prof = {}
        for s, groups in STAGES.items():
            prof[s] = profile_step(data, groups, runtime, pre, 128, args.steps)
            total = sum(prof[s].values())
            parts = ", ".join(f"{k} {v:.1f}" for k, v in prof[s].items())
            log(f"{s:7s} total {total:6.1f} ms ({128 / total * 1000:,.0f} img/s): {parts}")
        out["profile_ms"] = {s: {k: round(v, 2) for k, v in p.items()} for s, p in prof.items()}
        log("\ntorch.profiler, all layers, 3 steps, top operators by self CPU time:")
        log(profiler_top(data, LAYER_GROUPS, runtime, pre, 128))

    if "levers" not in skip:
        log("\n== 2. Levers: images/s of train_one_epoch, interleaved ==")
        variants: dict[str, list[Variant]] = {}
        for s, groups in STAGES.items():
            vs = [Variant("default", data, groups, runtime, pre),
                  Variant("channels_last trained", data, groups, replace(runtime, channels_last=True), pre),
                  Variant("batch 256", data, groups, runtime, pre, batch=256),
                  Variant("1 thread", data, groups, runtime, pre, threads=1)]
            if frozen_prefix(groups):
                vs.append(Variant("prefix contiguous", data, groups,
                                  replace(runtime, frozen_channels_last=False), pre))
            variants[s] = vs
        images = args.batches * 128
        ips: dict[tuple[str, str], list[float]] = {}
        for vs in variants.values():
            for v in vs:
                v.window(256, seed=999)
        for r in range(args.rounds):
            for s, vs in variants.items():
                for v in vs:
                    ips.setdefault((s, v.name), []).append(v.window(images, seed=r))
            log(f"  round {r + 1}/{args.rounds}")
        out["levers"] = {}
        for s, vs in variants.items():
            base = statistics.median(ips[(s, "default")])
            for v in vs:
                xs = ips[(s, v.name)]
                med = statistics.median(xs)
                log(f"{s:7s} {v.name:22s} {med:7.0f} img/s [{min(xs):5.0f}..{max(xs):5.0f}] "
                    f"= {med / base:5.2f}x default")
                out["levers"][f"{s}/{v.name}"] = {"images_per_s": round(med, 1),
                                                  "vs_default": round(med / base, 3)}

    if "compile" not in skip:
        log("\n== 3. torch.compile (inductor) ==")
        out["compile"] = {}
        for s in ("stage1", "all"):
            r = compile_suffix(data, STAGES[s], runtime, pre, args.steps * 2)
            log(f"{s:7s} trained suffix: first step {r['first_step_s']:.1f} s (compiling), then "
                f"{r['compiled_ms']:.1f} ms/step vs eager {r['eager_ms']:.1f} ms "
                f"= {r['eager_ms'] / r['compiled_ms']:.2f}x")
            out["compile"][s] = {k: round(v, 3) for k, v in r.items()}
        r = compile_prefix(data, runtime, pre, args.steps * 2)
        log(f"frozen prefix conv1..layer3 (inference, freezing): first call {r['first_call_s']:.1f} s, "
            f"then {r['compiled_ms']:.1f} ms vs eager {r['eager_ms']:.1f} ms "
            f"= {r['eager_ms'] / r['compiled_ms']:.2f}x (max |diff| {r['max_abs_diff']:.2e})")
        out["compile"]["prefix"] = {k: round(v, 4) for k, v in r.items()}

    if "int8" not in skip:
        log("\n== 4. int8 frozen prefix conv1..layer3 ==")
        try:
            r = int8_prefix(data, runtime, pre, args.steps * 2)
            log(f"fp32 BN-folded {r['fp32_folded_ms']:.1f} ms vs int8 {r['int8_ms']:.1f} ms per batch "
                f"of 128 = {r['fp32_folded_ms'] / r['int8_ms']:.2f}x; output relative error "
                f"{r['rel_error']:.3f}, mean cosine {r['mean_cosine']:.4f}")
            out["int8_prefix"] = {k: round(v, 4) for k, v in r.items()}
        except Exception as exc:  # the quantization API is optional in some builds
            log(f"int8 not measured: {type(exc).__name__}: {exc}")
            out["int8_prefix"] = {"error": f"{type(exc).__name__}: {exc}"}

    if args.int8_accuracy:
        log("\n== 5. int8 frozen prefix: accuracy on the transfer task (stage 1 on cached features) ==")
        r = int8_accuracy(Path(args.int8_accuracy), Path(args.data).expanduser(), 5000, 3)
        log(f"best val acc: fp32 prefix {r['val_acc_fp32']:.2%}, int8 prefix {r['val_acc_int8']:.2%}; "
            f"feature relative error {r['feature_rel_error']:.3f}; quantizing took {r['quantize_s']:.1f} s")
        out["int8_accuracy"] = {k: round(v, 4) for k, v in r.items()}

    emit_summary(out, bench="cpu_levers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
