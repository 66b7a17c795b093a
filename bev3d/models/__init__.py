"""Model zoo entry point: `build_model(cfg)` builds any config in configs/."""


def build_model(cfg):
    """Config (or its `model` section's parent) -> nn.Module, chosen by `cfg.model.type`."""
    # Imported here so that `import bev3d.models` stays light and each family loads on demand.
    from bev3d.models import deformable_detr, detector, detr

    builders = {
        "detr": detr.build,
        "deformable_detr": deformable_detr.build,
        "petr": detector.build,
        "detr3d": detector.build,
    }
    return builders[cfg.model.type](cfg)
