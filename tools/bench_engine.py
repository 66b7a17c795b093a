"""Engine figures: train iterations/s of the tiny configs, `bev3d test` time per sample, and the overhead
of `bev3d eval` over a bare devkit DetectionEval call. Prints and writes JSON.

    python tools/bench_engine.py --data-root data/synth --out out/bench_engine.json
"""

import argparse
import contextlib
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bev3d.config import load_config
from bev3d.engine.inference import evaluate
from bev3d.engine.runtime import seed_everything
from bev3d.engine.train import Trainer, build_train_components
from bev3d.evaluation.nuscenes_eval import evaluate_results, load_nuscenes, split_sample_tokens, write_results


def bench_train(cfg_name, data_root, iters, work_dir):
    cfg = load_config(cfg_name, [f"data.root={data_root}", f"work_dir={work_dir}", f"train.max_iters={iters}",
                                 f"train.log_interval={max(iters // 2, 1)}", "train.tensorboard=false",
                                 "eval.interval=0"])
    device = torch.device("cpu")
    model, criterion, train_set, collate_fn, _ = build_train_components(cfg, device)
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(cfg, model, criterion, train_set, collate_fn, None, device).fit()
    records = [json.loads(line) for line in (Path(work_dir) / "log.jsonl").read_text().splitlines()]
    last = records[-1]  # the second half of the run: data loading and the model warmed up
    return {"config": cfg_name, "iters": iters, "batch_size": cfg.data.batch_size,
            "image_size": cfg.data.image_size, "it_per_s": last["it_per_s"],
            "samples_per_s": last["it_per_s"] * cfg.data.batch_size, "peak_rss_mb": last["memory_mb"]}, cfg, model


def bench_test(cfg, model, out_dir):
    from bev3d.data import build_dataset
    from bev3d.evaluation.evaluators import build_evaluator
    from bev3d.models import build_postprocess

    dataset = build_dataset(cfg, cfg.data.val_split)
    _, stats = evaluate(cfg, model, build_postprocess(cfg), build_evaluator(cfg, dataset), dataset, out_dir,
                        torch.device("cpu"), quiet=True)
    return {"samples": stats["samples"], "ms_per_sample": 1000 * stats["s_per_sample"], "eval_s": stats["eval_s"]}


def bench_eval(data_root, out_dir, repeats=3):
    """GT copied as predictions, evaluated by bev3d and by a bare DetectionEval (tables already loaded)."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval
    from nuscenes.eval.detection.utils import category_to_detection_name

    nusc = load_nuscenes(data_root, "v1.0-mini")
    tokens = split_sample_tokens(nusc, "mini_val")
    results = {t: [] for t in tokens}
    for t in tokens:
        for a in nusc.get("sample", t)["anns"]:
            ann = nusc.get("sample_annotation", a)
            name = category_to_detection_name(ann["category_name"])
            if name:
                results[t].append({"sample_token": t, "translation": ann["translation"], "size": ann["size"],
                                   "rotation": ann["rotation"], "velocity": [0.0, 0.0], "detection_name": name,
                                   "detection_score": 0.5, "attribute_name": ""})
    path = write_results(Path(out_dir) / "gt.json", results)
    ours, bare = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        evaluate_results(path, data_root, "v1.0-mini", "mini_val", Path(out_dir) / "ours", quiet=True)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(path), "mini_val",
                          output_dir=str(Path(out_dir) / "bare"), verbose=False).main(0, render_curves=False)
        bare.append(time.perf_counter() - t)
    return {"samples": len(tokens), "boxes": sum(map(len, results.values())), "bev3d_eval_s": min(ours),
            "bare_detection_eval_s": min(bare), "overhead_s": min(ours) - min(bare)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="data/synth")
    parser.add_argument("--eval-data-root", default=None, help="dataset for the eval overhead (default: --data-root)")
    parser.add_argument("--configs", nargs="+", default=["petr_tiny_synth", "detr3d_tiny_synth"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="out/bench_engine.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    report = {"device": "cpu", "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
              "torch": torch.__version__, "train": [], "test": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            seed_everything(0)
            train_fig, cfg, model = bench_train(name, args.data_root, args.iters, Path(tmp) / name)
            report["train"].append(train_fig)
            print(f"train {name}: {train_fig['it_per_s']:.2f} it/s ({train_fig['samples_per_s']:.2f} samples/s, "
                  f"batch {train_fig['batch_size']}, {train_fig['image_size']})", flush=True)
            test_fig = {"config": name, **bench_test(cfg, model, Path(tmp) / f"{name}_test")}
            report["test"].append(test_fig)
            print(f"test {name}: {test_fig['ms_per_sample']:.1f} ms/sample over {test_fig['samples']} samples, "
                  f"evaluation {test_fig['eval_s']:.2f} s", flush=True)
        report["eval"] = bench_eval(args.eval_data_root or args.data_root, tmp)
        e = report["eval"]
        print(f"eval: bev3d {e['bev3d_eval_s']:.3f} s vs bare DetectionEval {e['bare_detection_eval_s']:.3f} s "
              f"(overhead {e['overhead_s'] * 1000:.0f} ms) on {e['samples']} samples / {e['boxes']} boxes")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
