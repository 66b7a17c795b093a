import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bev3d.cli import main as cli_main
from bev3d.config import dump_config, load_config, config_from_dict, config_to_dict
from bev3d.models.registry import DETR3DHeadConfig, PETRHeadConfig
from bev3d.errors import Bev3dError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_inheritance_deep_merge_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"lr": 1e-3, "max_epochs": 5}, "model": {"type": "detr3d"}})
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml", "train": {"max_epochs": 7}})
    cfg = load_config(child, ["train.seed=3", "data.image_size=[256,704]", "model.head.num_queries=50"])
    assert cfg.train.lr == 1e-3 and cfg.train.max_epochs == 7 and cfg.train.seed == 3
    assert cfg.data.image_size == [256, 704]
    assert isinstance(cfg.model.head, DETR3DHeadConfig) and cfg.model.head.num_queries == 50


def test_head_section_follows_model_type(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", {"model": {"type": "petr", "head": {"depth_num": 16}}}))
    assert isinstance(cfg.model.head, PETRHeadConfig) and cfg.model.head.depth_num == 16
    with pytest.raises(Bev3dError, match="model.head.depth_num"):
        load_config(write(tmp_path / "d.yaml", {"model": {"type": "detr3d", "head": {"depth_num": 16}}}))


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path / "c.yaml", {"model": {"type": "petr", "head": {"num_query": 10}}})
    with pytest.raises(Bev3dError) as err:
        load_config(path)
    msg = str(err.value)
    assert "model.head.num_query" in msg and str(path) in msg and "model.head.num_queries" in msg


def test_unknown_key_from_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", {"trian": {"lr": 1.0}})
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml"})
    with pytest.raises(Bev3dError) as err:
        load_config(child)
    assert str(base) in str(err.value) and "train" in str(err.value)


def test_wrong_type_and_override_errors(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"max_epochs": "ten"}})
    with pytest.raises(Bev3dError, match=r"train.max_epochs.*expected int, got str"):
        load_config(path)
    ok = write(tmp_path / "ok.yaml", {})
    with pytest.raises(Bev3dError, match=r"--opts"):
        load_config(ok, ["train.lrr=1"])
    with pytest.raises(Bev3dError, match=r"data.image_size\[1\].*expected int"):
        load_config(ok, ["data.image_size=[1, x]"])
    with pytest.raises(Bev3dError, match="key.sub=value"):
        load_config(ok, ["train.lr"])
    assert load_config(ok, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string


def test_missing_file_and_missing_base(tmp_path):
    with pytest.raises(Bev3dError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path / "child.yaml", {"_base_": "gone.yaml"})
    with pytest.raises(Bev3dError, match="gone.yaml"):
        load_config(child)


def test_dump_round_trip(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", {"model": {"type": "detr3d"}, "train": {"lr": 0.5}}))
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg and config_to_dict(again)["train"]["lr"] == 0.5


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_by_bare_name(path):
    assert load_config(path.stem) == load_config(path) == load_config(path.name)


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", {"model": {"head": {"num_query": 3}}})
    assert cli_main(["train", "--cfg", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "num_queries" in err and "Traceback" not in err
    assert cli_main(["train", "--cfg", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert cli_main(["no-such-command"]) == 2


def test_cli_debug_shows_traceback(tmp_path):
    bad = write(tmp_path / "bad.yaml", {"nope": 1})
    with pytest.raises(Bev3dError):
        cli_main(["--debug", "train", "--cfg", str(bad), "--dry-run"])


def test_dry_run_prints_resolved_config(tmp_path, capsys):
    cfg = write(tmp_path / "c.yaml", {"train": {"seed": 11}})
    assert cli_main(["train", "--cfg", str(cfg), "--dry-run", "--data-root", "/x/y", "--work-dir", "/w/d",
                     "--opts", "train.lr=0.1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["seed"] == 11 and printed["train"]["lr"] == 0.1 and printed["data"]["root"] == "/x/y"
    assert printed["work_dir"] == "/w/d"  # what training would use


@pytest.mark.parametrize("spelling", ["off", "false", "'off'", "no"])
def test_amp_off_in_every_documented_spelling(tmp_path, spelling):
    """YAML 1.1 reads off / false / no as a boolean: train.amp takes them as "off", on --opts and in files."""
    assert load_config(write(tmp_path / "c.yaml", {}), [f"train.amp={spelling}"]).train.amp == "off"
    (tmp_path / "f.yaml").write_text(f"train:\n  amp: {spelling}\n")
    assert load_config(tmp_path / "f.yaml").train.amp == "off"
    assert load_config(write(tmp_path / "c.yaml", {}), ["train.amp=bf16"]).train.amp == "bf16"


def test_values_outside_a_fields_choices_name_the_key_and_the_choices(tmp_path):
    ok = write(tmp_path / "ok.yaml", {})
    with pytest.raises(Bev3dError, match=r"train.amp in --opts: 'bf61' is not one of off, bf16, fp16"):
        load_config(ok, ["train.amp=bf61"])
    with pytest.raises(Bev3dError, match=r"train.amp.*True is not one of"):
        load_config(ok, ["train.amp=on"])  # YAML 1.1: on = true
    with pytest.raises(Bev3dError, match=r"model.head.sampler.*'bilinear' is not one of ms_deform_attn, grid_sample"):
        load_config("detr3d_tiny_synth", ["model.head.sampler=bilinear"])
    with pytest.raises(Bev3dError, match=r"data.normalize.*'imagenet'"):
        load_config(ok, ["data.normalize=imagenet"])


def test_moved_and_derived_keys_say_where_they_went(tmp_path):
    with pytest.raises(Bev3dError, match=r"model.neck.in_channels.*derived from the backbone"):
        load_config("petr_tiny_synth", ["model.neck.in_channels=[128]"])
    with pytest.raises(Bev3dError, match=r"model.head.denoising_groups.*model.denoising.groups"):
        load_config("petr_tiny_synth", ["model.head.denoising_groups=3"])
    with pytest.raises(Bev3dError, match=r"model.head.aux_loss.*model.loss.aux_loss"):
        load_config("detr_tiny_shapes", ["model.head.aux_loss=false"])
    with pytest.raises(Bev3dError, match=r"model.loss.mono.depth_map_weight.*model.loss.depth_map_weight"):
        load_config("monodetr_tiny_synth", ["model.loss.mono.depth_map_weight=2"])


def test_every_subcommand_has_help_with_example():
    for command in ("synth", "train", "test", "eval", "vis", "demo", "export", "build-ops"):
        out = subprocess.run([sys.executable, "-m", "bev3d", command, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "example" in out.stdout and f"bev3d {command}" in out.stdout


def test_help_does_not_import_heavy_modules():
    code = "import sys; from bev3d.cli import build_parser; build_parser(); " \
           "print(','.join(m for m in ('torch', 'open3d', 'nuscenes', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
