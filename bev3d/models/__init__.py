"""Model zoo entry point: the model, its criterion and its post-processor for a config.

    model = build_model(cfg)              # forward(batch, targets=None) -> SetPredictions
    criterion = build_criterion(cfg)      # criterion(predictions, targets) -> loss terms
    postprocess = build_postprocess(cfg)  # postprocess(predictions, batch) -> detections per sample

`model.type` picks the entry of the one model table, bev3d.models.registry.MODELS. Heavy modules are
imported on demand, so that `import bev3d.models` (and loading a config) stays light.
"""

import importlib

from bev3d.models.registry import MODELS


def build_model(cfg):
    """Config -> nn.Module of `cfg.model.type`, with the weights of `model.weights` when set."""
    model = importlib.import_module(MODELS[cfg.model.type].module).build(cfg)
    if cfg.model.weights:
        from bev3d.models.weights import load_model_weights

        load_model_weights(model, cfg.model.weights, cfg.model.weights_skip_mismatched)
    return model


def build_criterion(cfg):
    """Config -> SetCriterion for the model's box kind and the `model.loss` / `model.matcher` settings."""
    from bev3d.models.core import build

    return build.build_criterion(cfg)


def build_postprocess(cfg):
    """Config -> PostProcess (predictions -> detections) for the model's box kind."""
    from bev3d.models.core import build

    return build.build_postprocess(cfg)
