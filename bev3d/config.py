"""YAML configs mapped onto typed dataclasses.

A config file may name one `_base_: other.yaml` (path relative to the file); the
file is deep-merged over its base, then `--opts a.b=c` overrides (values parsed
with YAML scalar rules) are applied. Every key must exist in the dataclasses below
and every value must have the field's type: mistakes are reported with the dotted
key, the file it came from and the closest valid key.

Which dataclass describes `model.head` depends on `model.type` (HEAD_CONFIGS).
"""

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from bev3d.errors import Bev3dError

# ----------------------------------------------------------------------------- schema


@dataclass
class BackboneConfig:
    depth: int = 50  # 18 | 34 | 50 | 101
    style: str = "pytorch"  # pytorch (stride on the 3x3 conv) | caffe (stride on the 1x1 conv)
    frozen_stages: int = -1  # -1: nothing frozen; 0: stem; k: stem + stages 1..k
    norm_eval: bool = True  # keep BatchNorm statistics frozen in train mode
    out_indices: list[int] = field(default_factory=lambda: [3])  # stages 0..3 -> C2..C5
    with_cp: bool = False  # gradient checkpointing in the residual blocks
    frozen_bn: bool = True  # FrozenBatchNorm2d (fixed statistics and affine) instead of BatchNorm2d
    base_channels: int = 64  # stem width; stages have base, 2x, 4x, 8x (x4 for bottlenecks)
    weights: Optional[str] = None  # local torchvision or MSRA-caffe state dict


@dataclass
class NeckConfig:
    type: str = "fpn"  # fpn | channel_mapper (1x1 projections, DETR's input_proj)
    in_channels: list[int] = field(default_factory=lambda: [2048])
    out_channels: int = 256
    start_level: int = 0  # fpn only: first input that gets a lateral conv
    num_outs: int = 1  # levels beyond the inputs are extra stride-2 convs
    extra_on: str = "input"  # fpn only: extra levels start from the last input | output
    norm: str = "none"  # channel_mapper only: none | gn (GroupNorm(32), Deformable DETR)


@dataclass
class LossConfig:
    cls_weight: float = 2.0
    bbox_weight: float = 0.25
    giou_weight: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    use_focal: bool = True  # False: softmax cross-entropy with a no-object class
    no_object_weight: float = 0.1
    code_weights: list[float] = field(default_factory=lambda: [1.0] * 8 + [0.2, 0.2])


@dataclass
class MatcherConfig:
    cost_class: float = 2.0
    cost_bbox: float = 0.25
    cost_giou: float = 0.0


@dataclass
class DETRHeadConfig:
    num_queries: int = 100
    num_classes: int = 91
    embed_dims: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    ffn_dims: int = 2048
    dropout: float = 0.1
    aux_loss: bool = True
    position_encoding: str = "sine"  # sine | learned


@dataclass
class DeformableDETRHeadConfig:
    num_queries: int = 300
    num_classes: int = 91
    embed_dims: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    ffn_dims: int = 1024
    dropout: float = 0.1
    num_levels: int = 4
    num_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False  # queries = top num_queries encoder proposals
    aux_loss: bool = True
    attn_backend: str = "auto"  # ms_deform_attn backend: auto | reference | cpu | cuda


@dataclass
class PETRHeadConfig:
    num_queries: int = 900
    num_classes: int = 10
    embed_dims: int = 256
    num_heads: int = 8
    num_decoder_layers: int = 6
    ffn_dims: int = 2048
    dropout: float = 0.1
    in_level: int = 0  # which neck output the head attends to
    depth_num: int = 64
    depth_start: float = 1.0
    position_range: list[float] = field(default_factory=lambda: [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0])
    with_2d_pe: bool = True
    query_content: bool = False  # learned per-query decoder content instead of zeros (helps from-scratch training)
    ray_bias: bool = False  # cross-attention prior from the angle between cell rays and query anchors (not official)
    with_box_refine: bool = False  # each layer's predicted centres anchor the next layer (not official PETR)
    denoising_groups: int = 0  # noisy ground-truth copies per box as extra training queries (StreamPETR's DN); 0 = off
    denoising_noise: float = 1.0  # how far (in half box sizes) a copy's centre may move from its box


@dataclass
class DETR3DHeadConfig:
    num_queries: int = 900
    num_classes: int = 10
    embed_dims: int = 256
    num_heads: int = 8
    num_decoder_layers: int = 6
    ffn_dims: int = 512
    dropout: float = 0.1
    num_levels: int = 4
    with_box_refine: bool = True
    sampler: str = "ms_deform_attn"  # ms_deform_attn (faster, tools/bench_heads.py) | grid_sample


HEAD_CONFIGS = {
    "detr": DETRHeadConfig,
    "deformable_detr": DeformableDETRHeadConfig,
    "petr": PETRHeadConfig,
    "detr3d": DETR3DHeadConfig,
}


@dataclass
class ModelConfig:
    type: str = "petr"  # a key of HEAD_CONFIGS
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: typing.Any = field(default_factory=PETRHeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    pc_range: list[float] = field(default_factory=lambda: [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0])
    max_detections: int = 300  # NMS-free top-k over (query, class)
    score_threshold: float = 0.0
    post_center_range: list[float] = field(default_factory=lambda: [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0])

    @staticmethod
    def _field_type(name, raw):
        if name != "head":
            return None
        kind = raw.get("type", ModelConfig.type)
        if kind not in HEAD_CONFIGS:
            raise _ConfigKeyError("model.type", f"unknown model type {kind!r}; valid: {sorted(HEAD_CONFIGS)}")
        return HEAD_CONFIGS[kind]


@dataclass
class DataConfig:
    type: str = "nuscenes"  # nuscenes | coco
    root: str = "data/synth"
    version: str = "v1.0-mini"
    train_split: str = "mini_train"
    val_split: str = "mini_val"
    image_size: list[int] = field(default_factory=lambda: [512, 1408])  # (H, W) fed to the network
    resize_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # relative to the fitting scale
    flip: bool = False
    rot_range: list[float] = field(default_factory=lambda: [0.0, 0.0])  # BEV rotation (rad)
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # BEV scale
    grid_mask_prob: float = 0.0
    photometric: bool = False
    normalize: str = "caffe"  # caffe (BGR, std 1) | torchvision (RGB, ImageNet std)
    pad_divisor: int = 32
    crop_prob: float = 0.0  # coco only: probability of DETR's random-size crop augmentation
    batch_size: int = 1
    num_workers: int = 2
    skip_bad_samples: bool = False


@dataclass
class TrainConfig:
    max_epochs: int = 24
    max_iters: int = 0  # > 0 overrides max_epochs
    lr: float = 2e-4
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.01
    warmup_iters: int = 500
    warmup_ratio: float = 1.0 / 3
    min_lr_ratio: float = 1e-3
    grad_clip: float = 35.0
    accumulate: int = 1
    amp: str = "off"  # off | bf16 | fp16
    seed: int = 0
    log_interval: int = 50
    ckpt_interval: int = 1  # epochs
    keep_last: int = 3
    max_bad_steps: int = 10
    find_unused_parameters: bool = False  # DDP: set for models whose forward skips some parameters
    tensorboard: bool = True


@dataclass
class EvalConfig:
    interval: int = 1  # epochs; 0 disables periodic evaluation
    score_thr: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    work_dir: str = "work_dirs/default"


# ----------------------------------------------------------------------------- loading


class _ConfigKeyError(Exception):
    def __init__(self, key, message):
        super().__init__(message)
        self.key = key
        self.message = message


def config_dir():
    """The shipped configs: package data of an installed bev3d, or the checkout's configs/."""
    try:
        packaged = Path(str(resources.files("bev3d.configs")))
        if packaged.is_dir():
            return packaged
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name):
    """A path, or a bare name (`petr_r50_nus.yaml` or `petr_r50_nus`) of a shipped config."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = config_dir()
    for candidate in (shipped / path.name, shipped / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in shipped.glob("*.yaml"))
    raise Bev3dError(
        f"Config file not found: {name}. Give a path to a YAML file or the name of a shipped config "
        f"({', '.join(available) or 'none found in ' + str(shipped)})."
    )


def _read_yaml(path):
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise Bev3dError(f"Config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise Bev3dError(f"Config file {path} must hold a mapping at the top level, got {type(data).__name__}.")
    return data


def _merge(base, child, base_sources, child_source, prefix=""):
    """Deep-merge `child` over `base`; records which file each leaf key came from."""
    out = dict(base)
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, base_sources, child_source, dotted + ".")
        else:
            out[key] = value
            base_sources[dotted] = child_source
    return out


def _load_raw(path, sources, seen):
    path = Path(path).resolve()
    if path in seen:
        raise Bev3dError(f"Config {path} inherits from itself through _base_.")
    raw = _read_yaml(path)
    base_name = raw.pop("_base_", None)
    if base_name is None:
        return _merge({}, raw, sources, str(path))
    base_path = path.parent / base_name
    if not base_path.is_file():
        raise Bev3dError(f"Config {path} names _base_: {base_name}, but {base_path} does not exist.")
    base = _load_raw(base_path, sources, seen | {path})
    return _merge(base, raw, sources, str(path))


def _parse_override(text):
    if "=" not in text:
        raise Bev3dError(f"Override {text!r} must look like key.sub=value (e.g. train.lr=1e-4).")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise Bev3dError(f"Override {text!r}: the value is not valid YAML ({e}).") from None


def _apply_override(raw, key, value):
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _all_keys(cls, prefix=""):
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += _all_keys(f.default_factory, prefix + f.name + ".")
    return keys


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(tp, value, key):
    """Validate `value` against annotation `tp`; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(args[0], value, key)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _ConfigKeyError(key, f"expected {_type_name(tp)}, got {type(value).__name__} ({value!r})")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number users mean.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise _ConfigKeyError(key, f"expected {tp.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls, raw, prefix):
    if not isinstance(raw, dict):
        raise _ConfigKeyError(prefix.rstrip("."), f"expected a mapping for section {prefix.rstrip('.')}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + key
        if key not in names:
            raise _ConfigKeyError(dotted, "unknown key")
        tp = hints[key]
        override = getattr(cls, "_field_type", None)
        sub = override(key, raw) if override else None
        if sub is not None:
            tp = sub
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted + ".")
        else:
            kwargs[key] = _check_value(tp, value, dotted)
    for key in names - set(raw):
        override = getattr(cls, "_field_type", None)
        sub = override(key, raw) if override else None
        if sub is not None:
            kwargs[key] = sub()
    return cls(**kwargs)


def _valid_keys_for(raw):
    """Every dotted key valid for this raw config (the head section follows model.type)."""
    keys = _all_keys(Config)
    head_cls = HEAD_CONFIGS.get((raw.get("model") or {}).get("type", ModelConfig.type))
    if head_cls is not None:
        keys += _all_keys(head_cls, "model.head.")
    return keys


def load_config(path, overrides=()):
    """Load a YAML config (path or shipped name) with `_base_` and `key=value` overrides -> Config."""
    path = resolve_config_path(path)
    sources = {}
    raw = _load_raw(path, sources, frozenset())
    for text in overrides:
        key, value = _parse_override(text)
        _apply_override(raw, key, value)
        sources[key] = "--opts"
    try:
        return _build(Config, raw, "")
    except _ConfigKeyError as e:
        where = _source_of(e.key, sources, path)
        if e.message == "unknown key":
            close = difflib.get_close_matches(e.key, _valid_keys_for(raw), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]}?" if close else " See docs/configs.md for the valid keys."
            raise Bev3dError(f"Unknown config key {e.key} in {where}.{hint}") from None
        raise Bev3dError(f"Config key {e.key} in {where}: {e.message}.") from None


def _source_of(key, sources, path):
    while key:
        if key in sources:
            return sources[key]
        key = key.rsplit(".", 1)[0] if "." in key else ""
    return str(path)


def config_to_dict(cfg):
    return dataclasses.asdict(cfg)


def dump_config(cfg):
    """The resolved config as YAML text (what `--dry-run` prints and the work dir keeps)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_dict(raw):
    """Rebuild a Config from `config_to_dict` output (e.g. stored in a checkpoint)."""
    try:
        return _build(Config, raw, "")
    except _ConfigKeyError as e:
        raise Bev3dError(f"Stored config key {e.key}: {e.message}.") from None
