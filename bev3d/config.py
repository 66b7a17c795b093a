"""YAML configs mapped onto typed dataclasses.

A config file may name one `_base_: other.yaml` (path relative to the file); the
file is deep-merged over its base, then `--opts a.b=c` overrides (values parsed
with YAML scalar rules) are applied. Every key must exist in the dataclasses below
and every value must have the field's type: mistakes are reported with the dotted
key, the file it came from and the closest valid key. A field may list its valid values
(`metadata={"choices": ...}`); a value outside them is reported the same way.

Which dataclass describes `model.head` depends on `model.type` (bev3d.models.registry.MODELS, where the
head dataclasses live beside the model table).
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
from bev3d.models.registry import MODELS, PETRHeadConfig

# ----------------------------------------------------------------------------- schema


@dataclass
class BackboneConfig:
    type: str = field(default="resnet", metadata={"choices": ("resnet", "vovnet")})
    depth: int = 50  # resnet: 18 | 34 | 50 | 101; vovnet: 39 | 57 | 99 (V-<depth>-eSE)
    # resnet: pytorch (stride on the 3x3 conv) | caffe (stride on the 1x1 conv)
    style: str = field(default="pytorch", metadata={"choices": ("pytorch", "caffe")})
    frozen_stages: int = -1  # -1: nothing frozen; 0: stem; k: stem + stages 1..k
    norm_eval: bool = True  # keep BatchNorm statistics frozen in train mode
    out_indices: list[int] = field(default_factory=lambda: [3])  # stages 0..3 -> C2..C5
    with_cp: bool = False  # gradient checkpointing in the residual blocks
    frozen_bn: bool = True  # FrozenBatchNorm2d (fixed statistics and affine) instead of BatchNorm2d
    base_channels: int = 64  # resnet: stem width; stages have base, 2x, 4x, 8x (x4 for bottlenecks)
    dcn_stages: list[int] = field(default_factory=list)  # resnet: stages 0..3 whose 3x3 convs are DCNv2
    weights: Optional[str] = None  # local torchvision or MSRA-caffe state dict


@dataclass
class NeckConfig:
    # fpn | channel_mapper (1x1 projections, DETR's input_proj); input channels come from the backbone
    type: str = field(default="fpn", metadata={"choices": ("fpn", "channel_mapper")})
    out_channels: int = 256
    start_level: int = 0  # fpn only: first input that gets a lateral conv
    num_outs: int = 1  # levels beyond the inputs are extra stride-2 convs
    extra_on: str = field(default="input", metadata={"choices": ("input", "output")})  # fpn: extra levels start from
    norm: str = field(default="none", metadata={"choices": ("none", "gn")})  # channel_mapper: GroupNorm(32) or none
    # fpn: a 3x3 output conv on every level, or on the first only (PETR's CPFPN)
    output_convs: str = field(default="all", metadata={"choices": ("all", "first")})


@dataclass
class MonoLossConfig:
    """The weights of the monocular box terms (box kind "mono", bev3d.models.core.box_coder_mono)."""

    center_weight: float = 10.0  # L1 of the projected 3D centre
    depth_weight: float = 1.0  # Laplacian aleatoric-uncertainty depth loss
    dim_weight: float = 1.0  # L1 of the log sizes
    angle_weight: float = 1.0  # heading-bin cross-entropy + residual L1


@dataclass
class LossConfig:
    cls_weight: float = 2.0
    bbox_weight: float = 0.25
    giou_weight: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    use_focal: bool = True  # False: softmax cross-entropy with a no-object class (DETR)
    no_object_weight: float = 0.1
    code_weights: list[float] = field(default_factory=lambda: [1.0] * 8 + [0.2, 0.2])  # 3D: per box-code entry
    aux_loss: bool = True  # every decoder layer's predictions get the loss, not only the last layer's
    depth_map_weight: float = 1.0  # focal loss of a dense depth-bin map (MonoDETR; PETR's depth_supervision)
    heatmap_weight: float = 1.0  # focal loss of a dense class heatmap (PETR's heatmap_supervision)
    mono: MonoLossConfig = field(default_factory=MonoLossConfig)


@dataclass
class MatcherConfig:
    cost_class: float = 2.0
    cost_bbox: float = 0.25
    cost_giou: float = 0.0
    cost_center: float = 0.0  # box kind "mono": L1 of the projected 3D centre


@dataclass
class DenoisingConfig:
    """Query denoising (bev3d.models.core.denoising), for the heads that support it."""

    groups: int = 0  # noisy ground-truth copies per box as extra training queries; 0 = off
    box_noise: float = 1.0  # how far (in half box sizes) a copy's centre may move from its box
    label_noise: float = 0.0  # probability that a copy's input label is a random class (heads that embed labels)
    positive_radius: float = 0.75  # copies moved by more than this (half box sizes) must predict background


@dataclass
class ModelConfig:
    type: str = "petr"  # a key of bev3d.models.registry.MODELS
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: typing.Any = field(default_factory=PETRHeadConfig)  # the dataclass MODELS names for `type`
    loss: LossConfig = field(default_factory=LossConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    # whole-model weights loaded after building, over model.backbone.weights (fine-tuning; not a resume): a bev3d
    # checkpoint written by `bev3d train` or `bev3d convert`
    weights: Optional[str] = None
    # tensors of model.weights with another shape (class heads of another num_classes, query embeddings of another
    # num_queries) keep their initialisation, listed in a warning; false: they are an error
    weights_skip_mismatched: bool = False
    pc_range: list[float] = field(default_factory=lambda: [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0])
    max_detections: int = 300  # NMS-free top-k over (query, class)
    score_threshold: float = 0.0
    post_center_range: list[float] = field(default_factory=lambda: [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0])

    @staticmethod
    def _field_type(name, raw):
        if name != "head":
            return None
        kind = raw.get("type", ModelConfig.type)
        if kind not in MODELS:
            raise _ConfigKeyError("model.type", f"unknown model type {kind!r}; valid: {sorted(MODELS)}")
        return MODELS[kind].config


@dataclass
class CocoConfig:
    """DETR's COCO transforms (data.type: coco)."""

    short_side: int = 800  # test-time shorter side
    max_size: int = 1333  # cap on the longer side, train and test
    train_short_sides: list[int] = field(default_factory=list)  # training: one drawn per image; [] = short_side
    crop_prob: float = 0.0  # probability of DETR's random-size crop augmentation


@dataclass
class DataConfig:
    type: str = field(default="nuscenes", metadata={"choices": ("nuscenes", "coco")})
    root: str = "data/synth"
    version: str = "v1.0-mini"
    train_split: str = "mini_train"
    val_split: str = "mini_val"
    # camera-rig data (nuscenes): the (H, W) fed to the network and the training resize relative to the fitting scale
    image_size: list[int] = field(default_factory=lambda: [512, 1408])
    resize_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    flip: bool = False
    rot_range: list[float] = field(default_factory=lambda: [0.0, 0.0])  # BEV rotation (rad)
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # BEV scale
    grid_mask_prob: float = 0.0
    photometric: bool = False
    # caffe (BGR, std 1) | torchvision (RGB, ImageNet std) | bgr_std (BGR, ImageNet std: the VoVNet-99 recipes)
    normalize: str = field(default="caffe", metadata={"choices": ("caffe", "torchvision", "bgr_std")})
    pad_divisor: int = 32
    coco: CocoConfig = field(default_factory=CocoConfig)
    batch_size: int = 1
    num_workers: int = 2
    skip_bad_samples: bool = False
    # what a training item is: a whole camera rig, or one camera of it with the boxes it sees (monocular models);
    # inference always reads whole rigs
    train_view: str = field(default="rig", metadata={"choices": ("rig", "per_camera")})


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
    amp: str = field(default="off", metadata={"choices": ("off", "bf16", "fp16")})  # autocast dtype
    seed: int = 0
    log_interval: int = 50
    ckpt_interval: int = 1  # epochs
    keep_last: int = 3
    max_bad_steps: int = 10
    find_unused_parameters: bool = False  # DDP: set for models whose forward skips some parameters
    # streaming models (StreamPETR): each scene is cut into this many segments, each starting with a fresh memory
    stream_segments: int = 1
    # and the streams are taken in this many groups in turn, so that consecutive steps show different scenes
    stream_interleave: int = 1
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


# Keys that have moved or become derived: their message replaces "unknown key".
MOVED_KEYS = {
    "model.neck.in_channels": "is derived from the backbone's output channels (model.backbone.out_indices); remove it",
    "model.head.aux_loss": "has moved to model.loss.aux_loss",
    "model.head.denoising_groups": "has moved to model.denoising.groups",
    "model.head.denoising_noise": "has moved to model.denoising.box_noise",
    "data.crop_prob": "has moved to data.coco.crop_prob",
    "model.loss.mono.depth_map_weight": "has moved to model.loss.depth_map_weight (PETR's depth map has it too)",
}

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


def _check_value(tp, value, key, choices=None):
    """Validate `value` against annotation `tp` (and the field's `choices`); returns the (possibly converted) value."""
    if tp is str and value is False and choices and "off" in choices:
        value = "off"  # YAML 1.1 reads `off` (and `false`, `no`) as a boolean
    if choices is not None and not isinstance(value, (list, dict)) and value not in choices:
        raise _ConfigKeyError(key, f"{value!r} is not one of {', '.join(map(str, choices))}")
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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + key
        if key not in names:
            raise _ConfigKeyError(dotted, MOVED_KEYS.get(dotted, "unknown key"))
        tp = hints[key]
        override = getattr(cls, "_field_type", None)
        sub = override(key, raw) if override else None
        if sub is not None:
            tp = sub
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted + ".")
        else:
            kwargs[key] = _check_value(tp, value, dotted, fields[key].metadata.get("choices"))
    for key in names - set(raw):
        override = getattr(cls, "_field_type", None)
        sub = override(key, raw) if override else None
        if sub is not None:
            kwargs[key] = sub()
    return cls(**kwargs)


def _valid_keys_for(raw):
    """Every dotted key valid for this raw config (the head section follows model.type)."""
    keys = _all_keys(Config)
    model = MODELS.get((raw.get("model") or {}).get("type", ModelConfig.type))
    if model is not None:
        keys += _all_keys(model.config, "model.head.")
    return keys


def cli_overrides(args):
    """`--opts` plus the CLI shortcuts `--data-root` and `--work-dir` of an argparse namespace, as overrides."""
    overrides = list(getattr(args, "opts", None) or [])
    if getattr(args, "data_root", None):
        overrides.append(f"data.root={args.data_root}")
    if getattr(args, "work_dir", None):
        overrides.append(f"work_dir={args.work_dir}")
    return overrides


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
        _check_dataset_keys(raw)
        return _build(Config, raw, "")
    except _ConfigKeyError as e:
        where = _source_of(e.key, sources, path)
        if e.message == "unknown key":
            close = difflib.get_close_matches(e.key, _valid_keys_for(raw), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]}?" if close else " See docs/configs.md for the valid keys."
            raise Bev3dError(f"Unknown config key {e.key} in {where}.{hint}") from None
        raise Bev3dError(f"Config key {e.key} in {where}: {e.message}.") from None


def _check_dataset_keys(raw):
    """COCO images are sized by DETR's shorter-side rule, not by the camera-rig input size."""
    data = raw.get("data") or {}
    if data.get("type") == "coco":
        for key in ("image_size", "resize_range"):
            if key in data:
                raise _ConfigKeyError(f"data.{key}", "is the camera-rig input size, which data.type: coco does not "
                                      "use; size COCO images with data.coco.short_side, max_size and train_short_sides")


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
