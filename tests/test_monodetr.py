"""MonoDETR and the monocular box kind: depth-bin targets, local/global yaw, lifting and cross-camera merging, the
tiny model's forward/backward, and an overfit of two synthetic samples scored by the devkit's AP."""

import math

import numpy as np
import pytest
import torch
from nuscenes import NuScenes
from overfit import overfit

from bev3d.config import load_config
from bev3d.constants import CLASSES
from bev3d.data import NuScenesDataset, boxes_to_nuscenes, build_dataset, build_pipeline, collate
from bev3d.data.per_camera import camera_targets
from bev3d.geometry import intrinsics_4x4, rotation_z, transform_matrix
from bev3d.models import build_criterion, build_model, build_postprocess
from bev3d.models.core import SetPredictions
from bev3d.models.core.box_coder_mono import (BIN_LOGITS, CODE_SIZE, RESIDUALS, BoxCoderMono, MonoPostProcess,
                                              depth_map_target, lid_edges)

# a camera looking along LiDAR +y (x right, y down = LiDAR -z, z forward = LiDAR +y), 160 x 80 pixels
CAM_FROM_LIDAR = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
K = np.array([[100.0, 0.0, 80.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]])
HW = (80, 160)


def camera(yaw=0.0, translation=(0.0, 0.0, 0.0)):
    """lidar2img of the camera above, turned by `yaw` about LiDAR z and moved to `translation`."""
    cam2lidar = transform_matrix(translation, rotation_z(yaw) @ CAM_FROM_LIDAR.T)
    return intrinsics_4x4(K) @ np.linalg.inv(cam2lidar)


def code_of(row):
    """A mono box (11,) -> the prediction code that decodes to it (its heading bin certain)."""
    target = BoxCoderMono().encode(torch.as_tensor(row, dtype=torch.float32)[None])[0]
    code = torch.zeros(CODE_SIZE)
    code[:7] = target[:7]
    code[8:11] = target[7:10]
    b = int(target[10])
    code[BIN_LOGITS.start + b] = 20.0
    code[RESIDUALS.start + b] = target[11]
    return code


def rig_batch(lidar2imgs, hw=HW):
    n = len(lidar2imgs)
    return {"lidar2img": torch.tensor(np.stack(lidar2imgs), dtype=torch.float32)[None],
            "intrinsics": torch.tensor(np.stack([K] * n), dtype=torch.float32)[None], "img_shape": [hw]}


def test_lid_edges_and_depth_map_target():
    # d_i = 1 + 10 i (i + 1) / 20
    torch.testing.assert_close(lid_edges(4, 1.0, 11.0), torch.tensor([1.0, 2.0, 4.0, 7.0, 11.0]))
    edges = lid_edges(4, 1.0, 11.0)
    coder = BoxCoderMono()
    # u v l t r b depth w l h alpha; on an 8 x 4 map: box 1 covers x 3.2..5.2, y 1.2..3 -> cells x 3..5, y 1..2
    far = [0.5, 0.5, 0.1, 0.2, 0.15, 0.25, 5.0, 1.0, 1.0, 1.0, 0.0]  # depth 5 in [4, 7): bin 2
    near = [0.25, 0.5, 0.25, 0.5, 0.25, 0.5, 1.5, 1.0, 1.0, 1.0, 0.0]  # x 0..4, all rows; depth 1.5: bin 0
    beyond = [0.9, 0.1, 0.05, 0.05, 0.05, 0.05, 20.0, 1.0, 1.0, 1.0, 0.0]  # past d_max: background
    target = depth_map_target(coder.encode(torch.tensor([far, near, beyond])), edges, (4, 8), (1.0, 1.0))
    expected = torch.full((4, 8), 4)
    expected[1:3, 3:6] = 2
    expected[:, 0:4] = 0  # the nearer box wins where they overlap (column 3)
    torch.testing.assert_close(target, expected)
    # the map's valid part covers half of its width: the same box lands on half the columns
    half = depth_map_target(coder.encode(torch.tensor([far])), edges, (4, 8), (0.5, 1.0))
    expected = torch.full((4, 8), 4)
    expected[1:3, 1:3] = 2  # x 1.6..2.6
    torch.testing.assert_close(half, expected)


def test_camera_targets_of_a_box_ahead_and_its_depth_bin():
    # a 2 x 4 x 1.5 box 10 m ahead, its length along camera x: corners at x +-2, depth 9..11, height +-0.75
    box = np.array([[0.0, 10.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0]])
    rows, keep = camera_targets(box, camera(), K, HW)
    assert keep.tolist() == [0]
    half_w, half_h = 100 * 2 / 9 / 160, 100 * 0.75 / 9 / 80  # the near face spans the rectangle
    np.testing.assert_allclose(rows[0], [0.5, 0.5, half_w, half_h, half_w, half_h, 10.0, 2.0, 4.0, 1.5, 0.0],
                               atol=1e-9)
    # 80 LID bins in [1e-3, 60]: d_32 = 9.779, d_33 = 10.389, so 10 m is bin 32; cells x 5.78..10.22, y 3.17..4.83
    edges = lid_edges(80, 1e-3, 60.0)
    assert edges[32] < 10.0 < edges[33]
    target = depth_map_target(BoxCoderMono().encode(torch.tensor(rows, dtype=torch.float32)), edges, (8, 16),
                              (1.0, 1.0))
    expected = torch.full((8, 16), 80)
    expected[3:5, 5:11] = 32
    torch.testing.assert_close(target, expected)
    # behind the camera, or projecting outside the image: not this camera's target
    _, keep = camera_targets(np.array([[0.0, -10.0, 0.0, 2, 4, 1.5, 0, 0, 0], [30.0, 10.0, 0.0, 2, 4, 1.5, 0, 0, 0]]),
                             camera(), K, HW)
    assert keep.tolist() == []


@pytest.mark.parametrize("cam_yaw", [0.0, 0.7])
def test_local_yaw_decodes_to_the_global_yaw(cam_yaw):
    """A box straight ahead (its local yaw is its camera yaw) and one 45 degrees to the right in the image (local
    yaw = camera yaw - 45 degrees) decode to their LiDAR centres and yaws, for a turned and moved camera."""
    lidar2img = camera(cam_yaw, (1.0, -2.0, 1.5))
    cam2lidar = np.linalg.inv(np.linalg.inv(intrinsics_4x4(K)) @ lidar2img)
    ahead, right = cam2lidar[:3, :3] @ [0.0, 0.0, 10.0] + cam2lidar[:3, 3], cam2lidar[:3, :3] @ [8.0, 0.0, 8.0] + \
        cam2lidar[:3, 3]
    # LiDAR yaw cam_yaw + pi / 2 + 0.3 points the length axis 0.3 rad from the camera's optical axis (z) towards x:
    # camera yaw atan2(-z, x) = -(pi / 2 - 0.3)
    yaw = cam_yaw + math.pi / 2 - 0.3
    boxes = np.array([[*ahead, 1.0, 3.0, 1.5, yaw, 0, 0], [*right, 1.0, 3.0, 1.5, yaw, 0, 0]])
    hw = (80, 240)  # wide enough for the ray at 45 degrees: u = c_x + f_x = 180
    rows, keep = camera_targets(boxes, lidar2img, K, hw)
    assert keep.tolist() == [0, 1]
    np.testing.assert_allclose(rows[:, 0] * 240, [80.0, 180.0], atol=1e-9)
    camera_yaw = 0.3 - math.pi / 2
    np.testing.assert_allclose(rows[:, 10], [camera_yaw, camera_yaw - math.pi / 4], atol=1e-9)
    codes = torch.stack([code_of(r) for r in rows])[None]  # (1 image, 2, CODE_SIZE)
    decoded, keep = BoxCoderMono().decode(codes, rig_batch([lidar2img], hw))
    assert keep.all()
    torch.testing.assert_close(decoded[0, :, :3], torch.tensor(boxes[:, :3], dtype=torch.float32), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(decoded[0, :, 3:6], torch.tensor(boxes[:, 3:6], dtype=torch.float32))
    wrapped = (decoded[0, :, 6].double() - yaw + math.pi) % (2 * math.pi) - math.pi
    assert wrapped.abs().max() < 1e-5


def test_two_cameras_seeing_one_object_give_one_detection():
    """Cameras turned -/+ 20 degrees see a car 12 m ahead of the rig: after lifting, their two detections merge into
    the higher-scored one; a pedestrian at the same place (another class) and a far car stay."""
    cams = [camera(-0.35), camera(0.35)]
    car = np.array([[0.0, 12.0, 0.0, 1.8, 4.5, 1.6, 0.4, 0, 0]])
    far_car = np.array([[0.0, 30.0, 0.0, 1.8, 4.5, 1.6, 0.4, 0, 0]])
    codes, logits = [], []
    for n, lidar2img in enumerate(cams):
        rows = [camera_targets(b, lidar2img, K, HW)[0][0] for b in (car, car, far_car)]
        codes.append(torch.stack([code_of(r) for r in rows]))
        cls = torch.full((3, len(CLASSES)), -20.0)
        cls[0, 0], cls[1, CLASSES.index("pedestrian")], cls[2, 0] = (2.0, 1.0, 0.5) if n == 0 else (3.0, -20.0, -20.0)
        logits.append(cls)
    out = SetPredictions(torch.stack(logits)[None], torch.stack(codes)[None])  # (L=1, B*N=2, Q=3, ...)
    det = MonoPostProcess(BoxCoderMono(), max_detections=10, score_threshold=0.1, merge_distance=1.0)(
        out, rig_batch(cams))
    assert len(det) == 1  # one sample
    d = det[0]
    assert d["labels"].tolist() == [0, CLASSES.index("pedestrian"), 0]
    torch.testing.assert_close(d["scores"], torch.sigmoid(torch.tensor([3.0, 1.0, 0.5])))
    torch.testing.assert_close(d["boxes"][:, :3], torch.tensor(np.concatenate([car, car, far_car])[:, :3],
                                                               dtype=torch.float32), atol=1e-3, rtol=0)


def test_tiny_monodetr_forward_backward_and_rig_inference(synth_root):
    cfg = load_config("monodetr_tiny_synth", [f"data.root={synth_root}", "data.image_size=[64,176]"])
    train = build_dataset(cfg, "train")
    batch = collate([train[i] for i in range(6)])  # the six cameras of the first sample, one item each
    assert batch["img"].shape[:2] == (6, 1) and all(t["boxes"].shape[1] == 11 for t in batch["targets"])
    torch.manual_seed(0)
    model, criterion, postprocess = build_model(cfg).train(), build_criterion(cfg), build_postprocess(cfg)
    out = model(batch, batch["targets"])
    L, Q = cfg.model.head.num_decoder_layers, cfg.model.head.num_queries
    assert out.logits.shape == (L, 6, Q, 10) and out.boxes.shape == (L, 6, Q, CODE_SIZE)
    assert out.depth_map.logits.shape == (6, cfg.model.head.depth_bins + 1, 4, 12)  # stride 16 of 64 x 192 padded
    losses = criterion(out, batch["targets"])
    weighted = criterion.weighted(losses)
    terms = ("loss_cls", "loss_bbox", "loss_giou", "loss_center", "loss_depth", "loss_dim", "loss_angle")
    assert set(weighted) == {p + t for p in [""] + [f"d{i}." for i in range(L - 1)] for t in terms} | \
        {"loss_depth_map"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(weighted.values()).backward()
    head = [(n, p) for n, p in model.named_parameters() if n.startswith("head.")]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in head)
    # a rig sample trains nothing: its targets are per sample, not per camera
    rig = NuScenesDataset(synth_root, "v1.0-mini", "mini_val", build_pipeline(cfg.data, False, native_size=(270, 480)))
    rig_batch_ = collate([rig[0], rig[1]])
    with pytest.raises(Exception, match="per-camera"):
        criterion(model(rig_batch_), rig_batch_["targets"])
    model.eval()
    with torch.no_grad():
        det = postprocess(model(rig_batch_), rig_batch_)
    assert len(det) == 2 and all(d["boxes"].shape[1] == 9 and len(d["scores"]) > 0 for d in det)


def devkit_map(detections, samples, nusc):
    """nuScenes mAP (the devkit's accumulate / calc_ap at 0.5 / 1 / 2 / 4 m) over the classes present in `samples`
    (per sample (info, LiDAR boxes, labels)), boxes filtered as DetectionEval does (the class ranges from the ego,
    bicycle racks)."""
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes
    from nuscenes.eval.common.utils import center_distance
    from nuscenes.eval.detection.algo import accumulate, calc_ap
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionBox

    class_range = config_factory("detection_cvpr_2019").class_range

    def eval_boxes(per_sample):
        out = EvalBoxes()
        for token, results in per_sample:
            out.add_boxes(token, [DetectionBox(**{k: r[k] for k in ("sample_token", "translation", "size",
                                                                     "rotation", "velocity", "detection_name",
                                                                     "detection_score", "attribute_name")})
                                  for r in results])
        return filter_eval_boxes(nusc, add_center_dist(nusc, out), class_range)

    gt = eval_boxes([(info["sample_token"], boxes_to_nuscenes(b, -np.ones(len(b)), lab, info))
                     for info, b, lab in samples])
    pred = eval_boxes([(info["sample_token"], boxes_to_nuscenes(d["boxes"], d["scores"], d["labels"], info))
                       for (info, _, _), d in zip(samples, detections)])
    present = sorted({b.detection_name for b in gt.all})
    return float(np.mean([calc_ap(accumulate(gt, pred, name, center_distance, th), 0.1, 0.1)
                          for name in present for th in (0.5, 1.0, 2.0, 4.0)]))


# The tiny config at half width (64 channels, one encoder layer) on 64x176 images: the same model, cheaper steps.
OVERFIT_OPTS = ["data.image_size=[64,176]", "model.head.embed_dims=64", "model.neck.out_channels=64",
                "model.head.ffn_dims=128", "model.head.num_encoder_layers=1"]
LR, MAX_STEPS = 2e-3, 400


@pytest.mark.slow
def test_tiny_monodetr_overfits_two_samples(synth_root):
    cfg = load_config("monodetr_tiny_synth", [f"data.root={synth_root}"] + OVERFIT_OPTS)
    train = build_dataset(cfg, "train")  # per camera
    N = train.num_cams
    samples = [0, len(train) // N - 1]  # one sample of each training scene
    batch = collate([train[s * N + n] for s in samples for n in range(N)])
    targets = batch["targets"]
    # the same samples as whole rigs, through the test pipeline (the same geometry: no augmentation here)
    rig = NuScenesDataset(synth_root, "v1.0-mini", "mini_train",
                          build_pipeline(cfg.data, False, native_size=(270, 480)))
    rig_batch_ = collate([rig[s] for s in samples])
    truth = []  # the boxes some camera sees: what the model can detect
    for b, item in enumerate(rig_batch_["infos"]):
        boxes, labels = rig_batch_["targets"][b]["boxes"].double().numpy(), rig_batch_["targets"][b]["labels"]
        seen = sorted({int(i) for n in range(N) for i in camera_targets(
            boxes, rig_batch_["lidar2img"][b, n].double().numpy(), rig_batch_["intrinsics"][b, n].double().numpy(),
            rig_batch_["img_shape"][b])[1]})
        truth.append((item, boxes[seen], labels[seen].numpy()))
    torch.manual_seed(0)
    model, criterion, postprocess = build_model(cfg), build_criterion(cfg), build_postprocess(cfg)
    nusc = NuScenes(version="v1.0-mini", dataroot=str(synth_root), verbose=False)
    best, step = overfit(model, criterion, batch, targets,
                         lambda m: devkit_map(postprocess(m(rig_batch_), rig_batch_), truth, nusc),
                         LR, MAX_STEPS, MAX_STEPS * 3 // 4, weight_decay=1e-4)
    assert best >= 0.9, f"mAP {best:.3f} after {step} steps"
