"""CUDA correctness check: a tiny two-stage run through the real worker on the GPU (AMP
on), plus fast-path equalities on the device. Exit status 0 = all good.

    python -m benchmarks.gpu_check --data DIR   (DIR with train/ and test/ class folders)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.summary import emit_summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--json-out", default="")
    ap.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    ap.add_argument("--max-images", type=int, default=3000)
    args = ap.parse_args(argv)
    assert args.device == "cpu" or torch.cuda.is_available(), "no CUDA device"
    from core import config as cfgmod
    from core.engine.model import build_resnet18, forward_prefix, forward_suffix
    from core.engine.train import default_runtime
    from core.runs.store import RunStore
    from core.runs.worker import execute_run

    dev = torch.device(args.device)
    rt = default_runtime(dev)
    print("torch", torch.__version__, torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
          "runtime", rt, flush=True)
    out: dict = {"runtime": str(rt)}

    # 1. Fast paths on the GPU: single-pixel layer4 and folded prefix equal the plain model.
    from core.engine.model import FoldedPrefix
    torch.manual_seed(0)
    m = build_resnet18(10).to(dev).eval()
    x = torch.randn(64, 3, 32, 32, device=dev)
    with torch.no_grad():
        ref = m(x)
        fast = forward_suffix(m, x, [])
        pre = ["conv1", "layer1", "layer2", "layer3"]
        folded = FoldedPrefix(m, pre)(x)
        unfolded = forward_prefix(m, x, pre)
    out["max_abs_diff_fast_logits"] = (ref - fast).abs().max().item()
    out["max_rel_diff_folded_prefix"] = ((folded - unfolded).abs().max() / unfolded.abs().max()).item()
    print("fast-path diffs", out["max_abs_diff_fast_logits"], out["max_rel_diff_folded_prefix"], flush=True)
    ok = out["max_abs_diff_fast_logits"] < 1e-3 and out["max_rel_diff_folded_prefix"] < 1e-3

    # 2. A real two-stage run through the worker on CUDA, with and without feature cache.
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs")
        for cache in (False, True):
            cfg = cfgmod.preset_config("Two-stage", epochs=1, lr=0.02, data_source="folder",
                                       data_path=args.data, weights="random", device=args.device,
                                       max_train_images=args.max_images, batch_size=128)
            cfg = cfgmod.with_stage(cfg, 0, feature_cache=cache)
            run = store.create_run(cfg, name=f"gpu check cache={cache}")
            assert store.claim_run_now(run.id, os.getpid())
            status = execute_run(store, run.id)
            r = store.get_run(run.id)
            ips = [m.value for m in store.metrics(run.id, keys=["images_per_s"])]
            res = {"status": status, "error": r.error, "device": r.results.device,
                   "best_val_acc": r.best_val_acc, "test_acc": r.test_acc,
                   "images_per_s_by_epoch": [round(v) for v in ips]}
            print(f"run (stage-1 feature cache={cache}):", res, flush=True)
            out[f"run_cache_{cache}"] = res
            ok = ok and status == "finished" and str(res["device"]).startswith(args.device)
    out["ok"] = ok
    emit_summary(out, args.json_out, bench="gpu_check")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
