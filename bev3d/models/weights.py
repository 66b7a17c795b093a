"""Whole-model weights from a bev3d checkpoint (written by `bev3d train` or `bev3d convert`: "model" plus
"config"), for `bev3d test --ckpt` and `model.weights`. Any other file, e.g. an official checkpoint, is an error
that gives the `bev3d convert` command for it: official weights are never loaded under names they do not have."""

import logging

from bev3d.errors import Bev3dError


def read_model_weights(path, cfg_name="CONFIG"):
    """-> the model state dict of bev3d checkpoint `path`; `cfg_name` goes into the convert command of the error."""
    from bev3d.models.convert import convert_command, load_file

    obj = load_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "config" in obj:
        return obj["model"]
    state = obj if isinstance(obj, dict) else {}
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    raise Bev3dError(f"{path} is not a bev3d checkpoint (one written by `bev3d train` or `bev3d convert`, with "
                     f"'model' and 'config'). An official checkpoint must be converted first: "
                     f"{convert_command(path, list(state), cfg_name)}.")


def load_model_weights(model, path, skip_mismatched=False):
    """model.weights: every tensor of `model` from bev3d checkpoint `path`; with `skip_mismatched` the tensors of
    another shape keep their initialisation (a warning lists them), otherwise they are an error like missing or
    unknown keys."""
    state = read_model_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unknown = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:3]]
    if missing or unknown or (mismatched and not skip_mismatched):
        problems = [f"{len(missing)} model tensors missing from it (first: {missing[:5]})" if missing else "",
                    f"{len(unknown)} tensors the model does not have (first: {unknown[:5]})" if unknown else "",
                    f"{len(mismatched)} of another shape (file vs model, first: {shapes})" if mismatched else ""]
        hint = "Use the weights of this config's architecture."
        if mismatched and not missing and not unknown:
            hint = ("To fine-tune with another model.head.num_classes (or num_queries), set "
                    "model.weights_skip_mismatched=true: those tensors then keep their initialisation.")
        raise Bev3dError(f"model.weights {path} does not fit the model of this config: "
                         f"{'; '.join(p for p in problems if p)}. {hint}")
    if mismatched:
        logging.getLogger(__name__).warning(f"model.weights {path}: {len(mismatched)} tensors of another shape keep "
                                            f"their initialisation (model.weights_skip_mismatched): {mismatched}")
    model.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    return model
