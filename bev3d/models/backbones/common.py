"""What the backbones share: a stem and four stages with outputs at `out_indices`, stage freezing, and
reading a weights file."""

from pathlib import Path

import torch
import torch.nn as nn

from bev3d.errors import Bev3dError

# Wrappers of the backbone's keys in training frameworks' files: DDP, then DETR / Deformable DETR, mmdet3d,
# other detectors (bev3d's own checkpoints included). A file with such keys is a detector's: only those are read.
_MODULE_PREFIX = "module."
_BACKBONE_PREFIXES = ("backbone.0.body.", "img_backbone.", "backbone.body.", "backbone.")


class StagedBackbone(nn.Module):
    """Subclasses set `frozen_stages` (-1: none, 0: the stem, k: the stem and stages 1..k), `norm_eval`
    (BatchNorm statistics fixed in training), `out_indices` (0..3) and give `stem_and_stages()`."""

    def stem_and_stages(self):
        """[stem, stage 1, ..., stage 4] as modules."""
        raise NotImplementedError

    def _freeze_stages(self):
        parts = self.stem_and_stages()
        # Stages after the last output never run (forward stops there): frozen too, so that DDP does not
        # wait for gradients they cannot get. They stay in the state dict for checkpoint compatibility.
        for m in parts[:self.frozen_stages + 1] + parts[max(self.out_indices) + 2:]:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def load_partial(self, state):
        """Non-strict load -> (missing, unexpected) key lists, BatchNorm's step counters left out; a tensor
        whose shape differs from the model's is not loaded and is reported as unexpected, with both shapes."""
        own = self.state_dict()
        wrong = {k: v for k, v in state.items() if k in own and own[k].shape != v.shape}
        result = self.load_state_dict({k: v for k, v in state.items() if k not in wrong}, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        wrong = [f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})" for k, v in wrong.items()]
        return missing, wrong + list(result.unexpected_keys)


def read_state_dict(path):
    """A local weights file (torch.save or .safetensors; a bare state dict or one under "state_dict", "model"
    or "blobs") -> its tensors with framework prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise Bev3dError(f"Backbone weights file {path} does not exist. Set model.backbone.weights to a local "
                         f"backbone checkpoint (e.g. torchvision or MSRA-caffe ResNet), or to null to start from "
                         f"scratch.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:
            raise Bev3dError(f"Cannot read backbone weights file {path} ({type(e).__name__}: {e}); re-download or "
                             f"re-export it.") from None
    else:
        from bev3d.models.convert import load_file  # the reader of detectors' checkpoints

        obj = load_file(path)
    for key in ("state_dict", "model", "blobs"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise Bev3dError(f"Backbone weights file {path} does not hold a state dict of tensors.")
    bare, wrapped = {}, {}
    for k, v in obj.items():
        k = k.removeprefix(_MODULE_PREFIX)
        prefix = next((p for p in _BACKBONE_PREFIXES if k.startswith(p)), None)
        if prefix is None:
            bare[k] = v
        else:
            wrapped[k[len(prefix):]] = v
    return wrapped or bare
