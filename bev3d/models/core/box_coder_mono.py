"""The monocular box kind ("mono", MonoDETR): per-camera boxes <-> codes, costs, losses; the dense depth-map loss;
decoding to the LiDAR frame and the merge of all cameras' detections of a sample.

A target is a mono box `u v l t r b depth w l h alpha` of one camera (bev3d.data.per_camera.camera_targets): the
projected 3D centre and the distances from it to the 2D box edges as fractions of the image, the centre's depth,
the size, the local yaw. It encodes to `u v l t r b depth log(w) log(l) log(h) bin residual` (12): the local yaw
as one of NUM_BINS heading bins (centred at multiples of 2 pi / NUM_BINS) and the residual from that bin's centre.
The heads predict CODE_SIZE numbers per query, laid out as the slices below (log sizes, not MonoDETR's offsets
from a class mean size).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from bev3d.errors import Bev3dError
from bev3d.geometry import lid_depths, lid_index, lidar_yaw, ray_angle, transform_points
from bev3d.models.box_ops import generalized_box_iou
from bev3d.models.core.criterion import SetCriterion, mean_across_ranks
from bev3d.models.core.postprocess import PostProcess

NUM_BINS = 12
BIN_SIZE = 2 * math.pi / NUM_BINS
CENTRE, EXTENT, DEPTH, LOG_VARIANCE, SIZE = slice(0, 2), slice(2, 6), 6, 7, slice(8, 11)
BIN_LOGITS, RESIDUALS = slice(11, 11 + NUM_BINS), slice(11 + NUM_BINS, 11 + 2 * NUM_BINS)
CODE_SIZE = 11 + 2 * NUM_BINS
# the depth map's foreground cells weigh 13 times the background ones (CaDDN's and MonoDETR's balance)
FOREGROUND_WEIGHT, BACKGROUND_WEIGHT = 13.0, 1.0


def lid_edges(num_bins, depth_min, depth_max):
    """(num_bins + 1,) edges of the linear-increasing depth bins (LID): d_i at i = 0..K."""
    return lid_depths(torch.arange(num_bins + 1, dtype=torch.float32), num_bins, depth_min, depth_max)


def extent_xyxy(code):
    """(..., >= 6) u v l t r b -> (..., 4) the 2D box x1 y1 x2 y2 as fractions of the image."""
    u, v, left, top, right, bottom = code[..., :6].unbind(-1)
    return torch.stack([u - left, v - top, u + right, v + bottom], -1)


def depth_map_target(boxes, edges, map_hw, valid_ratio):
    """Mono boxes or their codes (T, >= 7) of one image -> (H_f, W_f) int64 depth-bin targets of a depth map whose
    valid part covers `valid_ratio` (w, h) of it: the cells a 2D box touches (floor / ceil of its edges in cells)
    get the bin of its depth, the nearest box wins where boxes overlap; other cells and depths outside the bins get
    the background bin K."""
    H, W = map_hw
    K = len(edges) - 1
    target = torch.full((H, W), K, dtype=torch.int64, device=boxes.device)
    if len(boxes) == 0:
        return target
    cells = boxes.new_tensor([W * float(valid_ratio[0]), H * float(valid_ratio[1])]).repeat(2)
    xyxy = extent_xyxy(boxes) * cells
    lo, hi = xyxy[:, :2].floor().long(), xyxy[:, 2:].ceil().long()
    depth = boxes[:, DEPTH]
    bins = lid_index(depth, K, float(edges[0]), float(edges[-1])).floor().long()
    bins = torch.where((bins >= 0) & (bins < K), bins, torch.full_like(bins, K))
    x, y = torch.arange(W, device=boxes.device), torch.arange(H, device=boxes.device)
    inside_x = (x >= lo[:, :1]) & (x < hi[:, :1])  # (T, W)
    inside_y = (y >= lo[:, 1:]) & (y < hi[:, 1:])  # (T, H)
    inside = inside_y[:, :, None] & inside_x[:, None, :]  # (T, H, W)
    # every cell takes the bin of the nearest box that touches it
    nearest = torch.where(inside, depth[:, None, None], torch.full_like(depth, math.inf)[:, None, None]).argmin(0)
    return torch.where(inside.any(0), bins[nearest], target)


def heatmap_target(boxes, labels, num_classes, map_hw, valid_ratio):
    """Mono boxes (T, >= 6) and labels (T,) of one image -> (K, H_f, W_f) float class heatmap of a map whose valid
    part covers `valid_ratio` (w, h) of it: per box an elliptical Gaussian around its projected centre in its
    class's channel, sigma one sixth of the 2D box along each axis (at least half a cell; TTFNet's shape), 1 at
    the centre's cell; the maximum where boxes of a class overlap."""
    H, W = map_hw
    target = torch.zeros(num_classes, H, W, device=boxes.device)
    if len(boxes) == 0:
        return target
    cells = boxes.new_tensor([W * float(valid_ratio[0]), H * float(valid_ratio[1])])
    centre = boxes[:, CENTRE] * cells  # (T, 2) x, y in cells
    size = (boxes[:, 2:4] + boxes[:, 4:6]) * cells  # (T, 2) l + r, t + b
    sigma = (size / 6).clamp(min=0.5)
    x = torch.arange(W, device=boxes.device) + 0.5
    y = torch.arange(H, device=boxes.device) + 0.5
    gx = torch.exp(-(x[None] - centre[:, :1]) ** 2 / (2 * sigma[:, :1] ** 2))  # (T, W)
    gy = torch.exp(-(y[None] - centre[:, 1:]) ** 2 / (2 * sigma[:, 1:] ** 2))  # (T, H)
    g = gy[:, :, None] * gx[:, None, :]  # (T, H, W)
    ix = centre[:, 0].floor().long().clamp(0, W - 1)
    iy = centre[:, 1].floor().long().clamp(0, H - 1)
    g[torch.arange(len(g)), iy, ix] = 1.0
    return target.scatter_reduce_(0, labels.long().view(-1, 1, 1).expand_as(g), g, "amax")


class BoxCoderMono:
    """Matching costs: L1 of the 3D centre ("center"), L1 of the 2D extents l t r b ("bbox"), -GIoU of the 2D boxes
    ("giou"). Losses: those three, the Laplacian aleatoric-uncertainty depth loss, L1 of the log sizes, the heading
    bin cross-entropy plus L1 of its residual. Decoding lifts the boxes to the LiDAR frame of the batch's cameras."""

    code_size = CODE_SIZE

    def encode(self, boxes):
        """(T, 11) mono boxes -> (T, 12) targets."""
        boxes = boxes.float()
        shifted = torch.remainder(boxes[:, 10] + BIN_SIZE / 2, 2 * math.pi)
        bins = (shifted / BIN_SIZE).floor().clamp(max=NUM_BINS - 1)
        residual = shifted - (bins + 0.5) * BIN_SIZE
        return torch.cat([boxes[:, :7], boxes[:, 7:10].log(), bins[:, None], residual[:, None]], 1)

    def match_costs(self, boxes, targets):
        """(N, CODE_SIZE) predictions, (T, 12) encoded targets -> {"center", "bbox", "giou"}: (N, T) each."""
        boxes = boxes.float()
        return {"center": torch.cdist(boxes[:, CENTRE], targets[:, CENTRE], p=1),
                "bbox": torch.cdist(boxes[:, EXTENT], targets[:, EXTENT], p=1),
                "giou": -generalized_box_iou(extent_xyxy(boxes), extent_xyxy(targets))}

    def losses(self, boxes, targets, num_boxes):
        """(M, CODE_SIZE) matched predictions, (M, 12) encoded targets -> loss terms summed over boxes / num_boxes."""
        boxes = boxes.float()
        giou = torch.diag(generalized_box_iou(extent_xyxy(boxes), extent_xyxy(targets)))
        log_variance = boxes[:, LOG_VARIANCE]
        depth = math.sqrt(2) * torch.exp(-log_variance) * (boxes[:, DEPTH] - targets[:, DEPTH]).abs() + log_variance
        bins = targets[:, 10].long()
        residual = boxes[:, RESIDUALS].gather(1, bins[:, None])[:, 0]
        angle = F.cross_entropy(boxes[:, BIN_LOGITS], bins, reduction="sum") + (residual - targets[:, 11]).abs().sum()
        return {"loss_center": (boxes[:, CENTRE] - targets[:, CENTRE]).abs().sum() / num_boxes,
                "loss_bbox": (boxes[:, EXTENT] - targets[:, EXTENT]).abs().sum() / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes,
                "loss_depth": depth.sum() / num_boxes,
                "loss_dim": (boxes[:, SIZE] - targets[:, 7:10]).abs().sum() / num_boxes,
                "loss_angle": angle / num_boxes}

    def decode(self, boxes, batch):
        """(B * N, k, CODE_SIZE) codes of the B * N camera images of a batch (sample-major) -> (B * N, k, 9) boxes
        in the LiDAR frame of each image's sample and an all-True (B * N, k) keep mask."""
        lidar2img = batch["lidar2img"].flatten(0, 1).double()  # (BN, 4, 4)
        intrinsics = batch["intrinsics"].flatten(0, 1).double().to(lidar2img.device)  # (BN, 3, 3)
        N = batch["lidar2img"].shape[1]
        img_shape = torch.as_tensor(batch["img_shape"], dtype=torch.float64, device=lidar2img.device).view(-1, 2)
        hw = img_shape.repeat_interleave(N, 0)[:, None]  # (BN, 1, 2) valid (H, W)
        code = boxes.double()
        u, v = code[..., 0] * hw[..., 1], code[..., 1] * hw[..., 0]
        depth = code[..., DEPTH]
        img2lidar = torch.linalg.inv(lidar2img)
        centres = transform_points(torch.stack([u * depth, v * depth, depth], -1), img2lidar)  # (BN, k, 3)
        k4 = torch.eye(4, dtype=torch.float64, device=lidar2img.device).repeat(len(intrinsics), 1, 1)
        k4[:, :3, :3] = intrinsics
        cam2lidar = img2lidar @ k4
        bins = code[..., BIN_LOGITS].argmax(-1, keepdim=True)
        alpha = bins[..., 0] * BIN_SIZE + code[..., RESIDUALS].gather(-1, bins)[..., 0]
        cam_yaw = alpha + ray_angle(u, intrinsics[:, None])
        yaw = lidar_yaw(cam_yaw, cam2lidar[:, None])
        out = torch.cat([centres, code[..., SIZE].exp(), yaw[..., None], torch.zeros_like(centres[..., :2])], -1)
        return out.float(), torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)


def valid_cells(valid_ratios, map_hw):
    """(B, 2) fractions (w, h) of a map that the unpadded images cover -> (B, H, W) bool mask of those cells."""
    H, W = map_hw
    cells = valid_ratios.float() * valid_ratios.new_tensor([W, H]).float()  # (B, 2) valid cells along x, y
    return (torch.arange(W, device=cells.device)[None, None] < cells[:, None, None, 0].round()) & \
        (torch.arange(H, device=cells.device)[None, :, None] < cells[:, None, None, 1].round())


class CameraMapCriterion(SetCriterion):
    """SetCriterion plus the dense per-image terms of the maps a head predicts: `loss_depth_map`, a softmax focal
    loss of the depth-bin logits against depth_map_target, foreground cells weighted FOREGROUND_WEIGHT, averaged
    over the valid cells; `loss_heatmap`, CenterNet's penalty-reduced focal loss of the class heatmap against
    heatmap_target, summed over the valid cells and divided by the number of box centres (both counts averaged
    over DDP ranks, as the boxes of the set losses are). A rig head predicts its
    maps per camera of every sample (sample-major), its targets carry the mono boxes each camera sees and their
    labels (`camera_boxes`, `camera_labels`: bev3d.data.per_camera.CameraBoxes)."""

    def __init__(self, *args, depth_edges, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("depth_edges", torch.as_tensor(depth_edges, dtype=torch.float32), persistent=False)

    def forward(self, outputs, targets):
        losses = super().forward(outputs, targets)
        if outputs.depth_map is not None:
            losses["loss_depth_map"] = self.depth_map_loss(outputs.depth_map, self.image_boxes(targets))
        if outputs.heatmap is not None:
            losses["loss_heatmap"] = self.heatmap_loss(outputs.heatmap, self.image_boxes(targets),
                                                       self.image_labels(targets))
        return losses

    def image_boxes(self, targets):
        """The mono boxes (T_i, >= 7) of every image of the maps, in their order."""
        if any("camera_boxes" not in t for t in targets):
            raise Bev3dError("The head predicts maps per camera (model.head.depth_supervision or "
                             "heatmap_supervision: true) but the targets carry no per-camera boxes: build the "
                             "training set with bev3d.data.build_dataset(cfg, 'train'), which adds them.")
        return [boxes for t in targets for boxes in t["camera_boxes"]]

    def image_labels(self, targets):
        """The class labels (T_i,) of image_boxes."""
        return [labels for t in targets for labels in t["camera_labels"]]

    def depth_map_loss(self, depth_map, image_boxes):
        logits = depth_map.logits.float()  # (B, K + 1, H, W)
        B, _, H, W = logits.shape
        edges = self.depth_edges.to(logits.device)
        target = torch.stack([depth_map_target(boxes.to(logits.device).float(), edges, (H, W), r)
                              for boxes, r in zip(image_boxes, depth_map.valid_ratios.tolist())])
        log_p = F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]  # (B, H, W)
        loss = -self.focal_alpha * (1 - log_p.exp()) ** self.focal_gamma * log_p
        K = len(edges) - 1
        weight = torch.where(target < K, FOREGROUND_WEIGHT, BACKGROUND_WEIGHT)
        valid = valid_cells(depth_map.valid_ratios, (H, W))
        return (loss * weight * valid).sum() / mean_across_ranks(valid.sum().float())

    def heatmap_loss(self, heatmap, image_boxes, image_labels):
        logits = heatmap.logits.float()  # (B, K, H, W)
        B, K, H, W = logits.shape
        target = torch.stack([heatmap_target(boxes.to(logits.device).float(), labels.to(logits.device), K, (H, W), r)
                              for boxes, labels, r in zip(image_boxes, image_labels, heatmap.valid_ratios.tolist())])
        peak = target == 1
        loss = torch.where(peak, -(1 - logits.sigmoid()) ** 2 * F.logsigmoid(logits),
                           -(1 - target) ** 4 * logits.sigmoid() ** 2 * F.logsigmoid(-logits))
        valid = valid_cells(heatmap.valid_ratios, (H, W))[:, None]
        return (loss * valid).sum() / mean_across_ranks((peak & valid).sum().float())


class MonoSetCriterion(CameraMapCriterion):
    """The monocular criterion: targets are per camera image (the per-camera data view), their mono boxes are the
    depth map's too."""

    def forward(self, outputs, targets):
        if len(targets) != outputs.logits.shape[1]:
            raise Bev3dError(f"A monocular model predicts per camera image ({outputs.logits.shape[1]} in this batch) "
                             f"but got targets of {len(targets)} samples: train it on the per-camera view "
                             f"(data.train_view: per_camera).")
        return super().forward(outputs, targets)

    def image_boxes(self, targets):
        return [t["boxes"] for t in targets]


def merge_detections(scores, labels, boxes, distance):
    """Detections of all cameras of one sample, sorted by score -> indices of those kept: greedy class-wise NMS
    on the BEV centre distance, a box within `distance` metres of a higher-scored one of its class is dropped."""
    xy = boxes[:, :2].double()
    close = (torch.cdist(xy, xy) < distance) & (labels[:, None] == labels[None])
    close = close.cpu().numpy()
    keep = np.ones(len(scores), bool)
    for i in range(len(scores)):
        if keep[i]:
            keep[i + 1:] &= ~close[i, i + 1:]
    return torch.from_numpy(np.flatnonzero(keep)).to(scores.device)


class MonoPostProcess(PostProcess):
    """Per camera image the top-k (query, class) detections, lifted to the LiDAR frame; per sample those of all its
    cameras merged by merge_detections -> the per-sample detections of the rig heads."""

    def __init__(self, coder, class_score="focal", max_detections=100, score_threshold=0.0, merge_distance=1.0):
        super().__init__(coder, class_score, max_detections, score_threshold)
        self.merge_distance = merge_distance

    @torch.no_grad()
    def __call__(self, outputs, batch):
        scores, labels, boxes, keep = self.select(outputs.logits[-1], outputs.boxes[-1], batch)  # (B * N, k, ...)
        B = len(batch["img_shape"])
        out = []
        for s, lab, b, k in zip(scores.view(B, -1), labels.view(B, -1), boxes.view(B, -1, boxes.shape[-1]),
                                keep.view(B, -1)):
            s, lab, b = s[k], lab[k], b[k]
            order = s.argsort(descending=True)
            s, lab, b = s[order], lab[order], b[order]
            kept = merge_detections(s, lab, b, self.merge_distance)[:self.max_detections]
            out.append({"scores": s[kept].float(), "labels": lab[kept], "boxes": b[kept]})
        return out
