"""`bev3d convert`: an official checkpoint -> a bev3d checkpoint of a config (for `bev3d test`, and as
`model.weights` / `model.backbone.weights` to fine-tune from).

One module per family (`FAMILIES`), each with `convert(source, cfg, model_state) -> state dict` built with
`common.KeyMap`: every official tensor is used or deliberately dropped, every model tensor is filled, so a
wrong family, a wrong config or an unknown layout is an error naming the first unmatched keys.
"""

import importlib
import time
from pathlib import Path

from bev3d.errors import Bev3dError

# --from value -> (module with convert(source, cfg, model_state), the checkpoints it reads); imported on demand,
# so that `bev3d --help` stays light
FAMILIES = {}


def read_official(path):
    """An official checkpoint file -> its flat state dict (under "model", "state_dict" or at the top)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise Bev3dError(f"Checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Bev3dError(f"Cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): it is damaged "
                         f"or not a torch checkpoint; download it again.") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise Bev3dError(f"{path} holds no state dict of tensors (under 'model', 'state_dict' or at the top).")
    return obj


def convert_state_dict(source, family, cfg):
    """Official state dict of `family` -> a state dict of `build_model(cfg)`."""
    from bev3d.models import build_model

    if family not in FAMILIES:
        raise Bev3dError(f"--from {family!r} is not a known family; use one of: {', '.join(FAMILIES)}.")
    module = importlib.import_module(FAMILIES[family][0])
    model_state = build_model(cfg).state_dict()
    return module.convert(source, cfg, model_state)


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
