import json
import socket

import torch
import torch.multiprocessing as mp

from bev3d.engine.checkpoint import load_checkpoint
from engine_toy import ddp_worker


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_log(work_dir):
    lines = (work_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["mode"] == "train"]


def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path):
    mp.spawn(ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), 1), nprocs=2, join=True)
    ddp_worker(0, 1, _free_port(), str(tmp_path / "single"), 2)

    ddp, single = _train_log(tmp_path / "ddp"), _train_log(tmp_path / "single")
    assert len(ddp) == len(single) == 4
    for a, b in zip(ddp, single):
        assert abs(a["loss_mse"] - b["loss_mse"]) < 1e-5
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert ddp[0]["num_samples"] == 1.0 and single[0]["num_samples"] == 2.0  # really batch 1 per process
    wa = load_checkpoint(tmp_path / "ddp" / "latest.pth")["model"]
    wb = load_checkpoint(tmp_path / "single" / "latest.pth")["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    # one set of files: rank 1 wrote nothing of its own
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir())
    assert len(load_checkpoint(tmp_path / "ddp" / "latest.pth")["rng"]) == 2
