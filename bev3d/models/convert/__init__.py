"""`bev3d convert`: an official checkpoint -> a bev3d checkpoint of a config (for `bev3d test`, and as
`model.weights` / `model.backbone.weights` to fine-tune from).

One module per family (`FAMILIES`), each with `convert(source, cfg, model_state) -> state dict` built with
`common.KeyMap`: every official tensor is used or deliberately dropped, every model tensor is filled, so a
wrong family, a wrong config or an unknown layout is an error naming the first unmatched keys.
"""

import argparse
import importlib
import time
from pathlib import Path

from bev3d.errors import Bev3dError

# --from value -> (module with convert(source, cfg, model_state), or "module:function", the checkpoints it reads);
# imported on demand, so that `bev3d --help` stays light
FAMILIES = {
    "detr": ("bev3d.models.convert.detr", "facebookresearch/detr {'model': ...}, e.g. detr-r50-e632da11.pth"),
    "deformable_detr": ("bev3d.models.convert.deformable_detr",
                        "fundamentalvision/Deformable-DETR {'model': ...}: base, --with_box_refine, --two_stage"),
    "conditional_detr": ("bev3d.models.convert.conditional_detr", "Atten4Vis/ConditionalDETR {'model': ...}"),
    "sparse_rcnn": ("bev3d.models.convert.sparse_rcnn", "PeizeSun/SparseR-CNN (Detectron2) {'model': ...}"),
    "petr": ("bev3d.models.convert.petr", "megvii-research/PETR {'state_dict': ...} (mmdet3d 0.17 box code)"),
    "petr_mmdet3d1": ("bev3d.models.convert.petr:convert_mmdet3d1", "mmdet3d 1.x projects/PETR re-releases"),
    "detr3d": ("bev3d.models.convert.detr3d", "WangYueFt/detr3d {'state_dict': ...} (mmdet3d 0.17 box code)"),
    "detr3d_mmdet3d1": ("bev3d.models.convert.detr3d:convert_mmdet3d1", "mmdet3d 1.x projects/DETR3D re-releases"),
    "streampetr": ("bev3d.models.convert.streampetr", "exiawsh/StreamPETR {'state_dict': ...}, e.g. "
                   "stream_petr_r50_flash_704_bs2_seq_24e.pth"),
}


def load_file(path):
    """torch.load of a checkpoint without unpickling code; a Bev3dError naming the file when it cannot be read."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise Bev3dError(f"Checkpoint {path} does not exist.")
    # The training scripts of DETR and Deformable DETR store their argparse arguments beside the weights.
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Bev3dError(f"Cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): it is damaged "
                         f"or not a torch checkpoint; download it again.") from None


def guess_families(keys):
    """The families (registered or not) whose official key layout `keys` look like, most likely first."""
    def starts(prefix):
        return any(k.startswith(prefix) for k in keys)

    if starts("backbone.0.body.") and starts("transformer.decoder."):
        if starts("transformer.level_embed"):
            return ["deformable_detr"]
        return ["conditional_detr"] if starts("transformer.decoder.ref_point_head.") else ["detr"]
    if starts("head.head_series.") and starts("init_proposal_boxes."):
        return ["sparse_rcnn"]
    if starts("pts_bbox_head."):
        if starts("pts_bbox_head.memory_embed."):
            return ["streampetr"]
        # the mmdet3d 1.x re-releases have the same keys (another box code)
        if starts("pts_bbox_head.position_encoder."):
            return ["petr", "petr_mmdet3d1"]
        if any(k.startswith("pts_bbox_head.") and ".attention_weights." in k for k in keys):
            return ["detr3d", "detr3d_mmdet3d1"]
        return ["petr", "petr_mmdet3d1", "detr3d", "detr3d_mmdet3d1"]
    return []


def convert_command(src, keys, cfg_name):
    """The `bev3d convert` command for an official file with these keys, and the file it writes."""
    guesses = [f for f in guess_families(keys) if f in FAMILIES]
    dst = Path(src).with_name(f"{Path(src).stem}_bev3d.pth")
    family = guesses[0] if len(guesses) == 1 else "FAMILY"
    text = f"bev3d convert {src} --from {family} --cfg {cfg_name} --out {dst}"
    if len(guesses) != 1:
        text += (f" (FAMILY: {' or '.join(guesses)})" if guesses else
                 f" (FAMILY: the code base it comes from, one of {', '.join(sorted(FAMILIES))})")
    return f"{text}, then use {dst}"


def read_official(path):
    """An official checkpoint file -> its flat state dict (under "model", "state_dict" or at the top)."""
    import torch

    obj = load_file(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise Bev3dError(f"{path} holds no state dict of tensors (under 'model', 'state_dict' or at the top).")
    return obj


def convert_state_dict(source, family, cfg):
    """Official state dict of `family` -> a state dict of `build_model(cfg)`."""
    from bev3d.models.registry import MODELS

    if family not in FAMILIES:
        raise Bev3dError(f"--from {family!r} is not a known family; use one of: {', '.join(FAMILIES)}.")
    module, _, function = FAMILIES[family][0].partition(":")
    convert = getattr(importlib.import_module(module), function or "convert")
    # The names and shapes to fill: the model as build_model makes it, without its model.weights (replaced anyway).
    model_state = importlib.import_module(MODELS[cfg.model.type].module).build(cfg).state_dict()
    try:
        return convert(source, cfg, model_state)
    except Bev3dError as e:
        guesses = guess_families(source)
        guesses = [] if family in guesses else [f for f in guesses if f in FAMILIES]  # same keys: not the family
        hint = (f"Its keys look like a {' or '.join(guesses)} checkpoint: try --from {guesses[0]} with a config of "
                f"that model." if guesses else f"The file's first keys: {list(source)[:4]}; --from values: "
                f"{', '.join(FAMILIES)}.")
        raise Bev3dError(f"{e} {hint}") from None


def convert_file(src, family, cfg, dst):
    """Convert `src` and write the bev3d checkpoint `dst` (atomically; nothing is written on an error)."""
    from bev3d.config import config_to_dict
    from bev3d.engine.checkpoint import save_checkpoint

    state = convert_state_dict(read_official(src), family, cfg)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, {"model": state, "config": config_to_dict(cfg),
                          "converted_from": {"file": str(src), "family": family}})
    return state


def main(args):
    from bev3d.config import cli_overrides, load_config

    cfg = load_config(args.cfg, cli_overrides(args))
    start = time.perf_counter()
    state = convert_file(args.src, getattr(args, "from"), cfg, args.out)
    print(f"bev3d convert: {len(state)} tensors of {args.src} ({getattr(args, 'from')}) written to {args.out} "
          f"for {args.cfg} in {time.perf_counter() - start:.1f} s")
    return 0
