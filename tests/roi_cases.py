"""What the RoI-based 2D models' tests share: a feature pyramid that padding cannot change, and the padding check."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class PoolPyramid(nn.Module):
    """A fixed 1x1 conv of the image, average-pooled over non-overlapping s x s windows for each stride s: every
    cell depends on its own window only, so zero padding leaves the cells over the valid image as they are (a real
    backbone's receptive fields reach into the padding)."""

    def __init__(self, channels, strides):
        super().__init__()
        self.proj, self.strides = nn.Conv2d(3, channels, 1), strides

    def forward(self, img):
        x = self.proj(img)
        return [F.avg_pool2d(x, s) for s in self.strides]


def check_padding_invariance(model, channels, strides):
    """The model (backbone and neck replaced by PoolPyramid) must give the same logits and boxes for an image alone
    and padded with zeros below and to the right: boxes are relative to the valid image, RoIs in its pixels.
    -> the predictions, for the caller's own checks."""
    model.backbone, model.neck = nn.Identity(), PoolPyramid(channels, strides)
    model.eval()
    img = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 128, 160, dtype=torch.bool)
    mask[:, 64:], mask[:, :, 96:] = True, True
    with torch.no_grad():
        a = model({"img": img, "mask": torch.zeros(1, 64, 96, dtype=torch.bool)})
        b = model({"img": F.pad(img, (0, 64, 0, 64)), "mask": mask})
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.boxes, a.boxes, atol=1e-6, rtol=0)
    # the case keeps its boxes off the valid border (there RoIAlign clamps where a padded map has a zero row)
    corners = torch.cat([a.boxes[..., :2] - a.boxes[..., 2:] / 2, a.boxes[..., :2] + a.boxes[..., 2:] / 2], -1)
    assert corners.min() > 0.05 and corners.max() < 0.9, (corners.min(), corners.max())
    return a
