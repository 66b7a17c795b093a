"""A short end-to-end run on the synthetic set: `bev3d train` (with its periodic evaluation) then
`bev3d test`, through the CLI. The learning bar lives in tools/bench_engine.py and the demo, not here."""

import json

import pytest

from bev3d.cli import main as cli

TINY = ["data.image_size=[64,176]", "data.num_workers=0", "data.batch_size=1", "train.tensorboard=false",
        "model.head.num_queries=30", "model.head.num_decoder_layers=1", "train.log_interval=1"]


@pytest.mark.slow
def test_train_then_test_writes_metrics(tmp_path, synth_root):
    work = tmp_path / "work"
    rc = cli(["train", "--cfg", "petr_tiny_synth", "--data-root", str(synth_root), "--work-dir", str(work),
              "--opts", "train.max_iters=2", "eval.interval=1", *TINY])
    assert rc == 0
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["mode"] == "train"] == [1, 2]
    evals = [r for r in records if r["mode"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["NDS"] <= 1.0
    assert (work / "eval_epoch_0" / "metrics_summary.json").is_file()
    assert {"iter_2.pth", "latest.pth", "best.pth", "config.yaml"} <= {p.name for p in work.iterdir()}

    out = tmp_path / "test"
    rc = cli(["test", "--cfg", "petr_tiny_synth", "--data-root", str(synth_root), "--ckpt", str(work / "latest.pth"),
              "--out", str(out), "--opts", *TINY])
    assert rc == 0
    results = json.loads((out / "results_nusc.json").read_text())
    assert set(results["meta"]) == {"use_camera", "use_lidar", "use_radar", "use_map", "use_external"}
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["nd_score"] == evals[0]["NDS"]  # same weights, same data: same score
