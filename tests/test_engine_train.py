import json
import math

import pytest
import torch

from bev3d.engine import checkpoint as ckpt_mod
from bev3d.engine.checkpoint import load_checkpoint, save_checkpoint
from bev3d.engine.optim import build_optimizer, lr_factor
from bev3d.engine.runtime import resolve_amp, seed_everything
from bev3d.engine.train import Trainer
from bev3d.errors import Bev3dError
from engine_toy import ToyCriterion, ToyDataset, ToyModel, toy_config


def _train(cfg, dataset=None, resume=None, dropout=0.1):
    seed_everything(cfg.train.seed)
    trainer = Trainer(cfg, ToyModel(dropout), ToyCriterion(), dataset or ToyDataset())
    trainer.fit(resume=resume)
    return trainer


def _log(work_dir):
    return [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_param_groups():
    cfg = toy_config("unused", lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05)
    model = ToyModel()
    opt = build_optimizer(model, cfg.train)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    expect = {  # name -> (lr, weight decay)
        "backbone.0.weight": (1e-4, 0.05),
        "backbone.0.bias": (1e-4, 0.0),
        "query_embed": (1e-3, 0.0),
        "norm.weight": (1e-3, 0.0),
        "norm.bias": (1e-3, 0.0),
        "head.weight": (1e-3, 0.05),
        "head.bias": (1e-3, 0.0),
    }
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert (g["lr"], g["weight_decay"]) == pytest.approx(expect[name]), name


def test_warmup_cosine_schedule():
    total, warm, ratio, min_ratio = 100, 10, 1 / 3, 1e-3
    assert lr_factor(0, total, warm, ratio, min_ratio) == pytest.approx(1 / 3)
    assert lr_factor(5, total, warm, ratio, min_ratio) == pytest.approx(1 / 3 + (2 / 3) * 0.5)
    assert lr_factor(10, total, warm, ratio, min_ratio) == pytest.approx(1.0)
    assert lr_factor(55, total, warm, ratio, min_ratio) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)
    assert lr_factor(100, total, warm, ratio, min_ratio) == pytest.approx(min_ratio)


def test_trainer_applies_schedule_and_backbone_mult(tmp_path):
    cfg = toy_config(tmp_path, max_epochs=1, warmup_iters=2, warmup_ratio=0.5)
    _train(cfg)
    lrs = [r["lr"] for r in _log(tmp_path) if r["mode"] == "train"]  # lr after each step (4 steps)
    total = 4
    expect = [1e-2 * lr_factor(i, total, 2, 0.5, cfg.train.min_lr_ratio) for i in range(1, total + 1)]
    assert lrs == pytest.approx(expect)


def test_exact_resume_after_epoch(tmp_path):
    straight = _train(toy_config(tmp_path / "a"))
    resumed = _train(toy_config(tmp_path / "b"), resume=tmp_path / "a" / "epoch_1.pth")
    _assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    a = [r for r in _log(tmp_path / "a") if r["iter"] > 4]
    b = _log(tmp_path / "b")
    assert [r["loss_mse"] for r in a] == [r["loss_mse"] for r in b]
    # the check can fail: another seed gives other weights
    other = _train(toy_config(tmp_path / "c", seed=1))
    assert not torch.equal(other.model.head.weight, straight.model.head.weight)


def test_ctrl_c_saves_and_resume_is_exact(tmp_path):
    straight = _train(toy_config(tmp_path / "a"))
    cfg = toy_config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, ToyDataset(interrupt_at=7))  # SIGINT while loading step 4's batch -> stops after step 4
    assert (tmp_path / "b" / "iter_4.pth").is_file()
    state = load_checkpoint(tmp_path / "b" / "latest.pth")
    assert (state["iter"], state["epoch"], state["iter_in_epoch"]) == (4, 1, 0)
    with pytest.raises(KeyboardInterrupt):  # again mid-epoch: after step 6 of 8
        _train(cfg, ToyDataset(interrupt_at=3), resume="latest")
    assert load_checkpoint(tmp_path / "b" / "latest.pth")["iter_in_epoch"] == 2
    resumed = _train(cfg, resume="latest")
    _assert_same_state(straight.model.state_dict(), resumed.model.state_dict())


def test_checkpoint_write_interrupted_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint(path, {"w": torch.ones(3), "iter": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.zeros(3), "iter": 2})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iter"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


def test_corrupt_checkpoint_names_file(tmp_path):
    path = tmp_path / "epoch_3.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(Bev3dError, match="epoch_3.pth"):
        load_checkpoint(path)


def test_keep_last_and_latest(tmp_path):
    _train(toy_config(tmp_path, max_epochs=4, keep_last=2))
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["epoch_3.pth", "epoch_4.pth", "latest.pth"]
    assert load_checkpoint(tmp_path / "latest.pth")["epoch"] == 4
    assert (tmp_path / "config.yaml").is_file()


def test_logged_entries_and_total_follow_the_criterion_weights(tmp_path):
    class Doubled(ToyCriterion):
        weight_dict = {"loss_mse": 2.0}

    seed_everything(0)
    Trainer(toy_config(tmp_path / "a", max_epochs=1), ToyModel(), ToyCriterion(), ToyDataset()).fit()
    seed_everything(0)
    Trainer(toy_config(tmp_path / "b", max_epochs=1), ToyModel(), Doubled(), ToyDataset()).fit()
    a, b = ([r for r in _log(tmp_path / d) if r["mode"] == "train"] for d in "ab")
    # the logged term is its weighted value, the total is the sum of the weighted terms, the rest is logged as is
    assert b[0]["loss_mse"] == pytest.approx(2 * a[0]["loss_mse"]) and b[0]["loss"] == pytest.approx(b[0]["loss_mse"])
    assert a[0]["num_samples"] == b[0]["num_samples"] == 2.0


def test_non_finite_loss_skips_then_stops(tmp_path):
    cfg = toy_config(tmp_path, max_epochs=3, max_bad_steps=3)
    with pytest.raises(Bev3dError, match="iteration 7"):
        _train(cfg, ToyDataset(nan_from=9))  # samples 9.. give NaN: steps 5, 6, 7 are bad
    state = load_checkpoint(tmp_path / "iter_7.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    logged = [r["iter"] for r in _log(tmp_path) if r["mode"] == "train"]
    assert logged[:4] == [1, 2, 3, 4]


def test_accumulation_matches_larger_batch(tmp_path):
    big = toy_config(tmp_path / "a", max_epochs=1)
    small = toy_config(tmp_path / "b", max_epochs=1, accumulate=2)
    small.data.batch_size = 1
    a = _train(big, ToyDataset(noise=False), dropout=0.0)
    b = _train(small, ToyDataset(noise=False), dropout=0.0)
    assert a.iter == b.iter == 4
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has AMX, so the bf16 path runs on any CI machine."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)


def test_cpu_amp_falls_back_without_native_bf16(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    warnings = []
    assert resolve_amp("bf16", torch.device("cpu"), warn=warnings.append) == "off"
    assert resolve_amp("fp16", torch.device("cpu"), warn=warnings.append) == "off"
    assert len(warnings) == 2 and "AVX512-BF16 or AMX" in warnings[0]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_amp("bf16", torch.device("cpu"), warn=warnings.append) == "bf16"
    assert resolve_amp("fp16", torch.device("cpu"), warn=warnings.append) == "bf16"


def test_bf16_autocast_trains(tmp_path, native_bf16):
    t = _train(toy_config(tmp_path, amp="bf16", max_epochs=3))
    losses = [r["loss_mse"] for r in _log(tmp_path) if r["mode"] == "train"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < sum(losses[:4])
    assert t.amp == "bf16"
    assert t.model.activation_dtypes == {torch.bfloat16}  # the steps really ran under bf16 autocast
    t_off = _train(toy_config(tmp_path / "off", amp="off", max_epochs=1))
    assert t_off.model.activation_dtypes == {torch.float32}


def test_cpu_features_and_demo_estimate(monkeypatch):
    """The demo names the CPU's bf16 tier and scales its measured 2-core minutes to the usable cores."""
    from bev3d.engine.demo import DEMO_MINUTES, cpu_summary
    from bev3d.engine.runtime import cpu_features

    features = cpu_features()
    assert features["cores"] >= 1 and isinstance(features["isa"], str) and features["name"]
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    text, minutes = cpu_summary({**cpu_features(), "cores": 1})
    assert "float32" in text and minutes == 2 * DEMO_MINUTES["float32"]
    text, minutes = cpu_summary({"name": "x", "cores": 16, "isa": "AVX512", "avx512_bf16": True, "amx": True})
    assert "AMX" in text and minutes == DEMO_MINUTES["AMX"]
    text, _ = cpu_summary({"name": "x", "cores": 2, "isa": "AVX512", "avx512_bf16": True, "amx": False})
    assert "AVX512-BF16" in text
