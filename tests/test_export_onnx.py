"""`bev3d export`: every tiny config's ONNX graph (standard operators only) equals eager PyTorch in onnxruntime on
inputs it was not traced on, at another batch size too; the camera matrices and image shapes are live inputs;
the top-k decoding, RoIAlign's level choice and the memory hook of streaming models survive the export."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from bev3d.cli import main
from bev3d.config import load_config
from bev3d.engine.export import (build_graph, export_onnx, max_differences, onnx_session, run_eager, run_onnx,
                                 sample_batch, synthetic_batch, unambiguous_ranks)
from bev3d.geometry import transform_matrix, yaw_to_quaternion
from bev3d.models.core import SetPredictions
from bev3d.models.export import ExportGraph
from query_sets import assert_same_queries

onnx = pytest.importorskip("onnx", reason="bev3d export needs onnx (pip install -e '.[export]')")
pytest.importorskip("onnxruntime", reason="bev3d export --check needs onnxruntime (pip install -e '.[export]')")

CONFIGS_3D = ["petr_tiny_synth", "detr3d_tiny_synth"]
CONFIGS_2D = ["detr_tiny_shapes", "deformable_detr_tiny_shapes", "conditional_detr_tiny_shapes",
              "anchor_detr_tiny_shapes", "efficient_detr_tiny_shapes", "sparse_rcnn_tiny_shapes",
              "dynamic_detr_tiny_shapes"]
ATOL = 1e-4  # float32 onnxruntime vs eager


def _cfg(name, synth_root):
    if name in CONFIGS_3D:  # the validation samples of the shared synthetic set, at the CPU-test size
        return load_config(name, [f"data.root={synth_root}", "data.version=v1.0-mini", "data.val_split=mini_val",
                                  "data.image_size=[64,176]"])
    return load_config(name)


def _batch(cfg, index, batch_size=2):
    """Two different batches per config: validation samples (3D) or synthetic images (2D)."""
    if cfg.data.type == "coco":
        return synthetic_batch(cfg, batch_size, seed=index)
    return sample_batch(cfg, batch_size, index)


def _exported(cfg, path, postprocess=False):
    torch.manual_seed(0)
    graph = build_graph(cfg, postprocess=postprocess)
    inputs = graph.inputs(_batch(cfg, 0))
    export_onnx(graph, inputs, path)
    return graph, onnx_session(path, threads=1)


def _run(graph, session, batch):
    """-> (onnxruntime outputs, eager outputs) of one collated batch."""
    inputs = graph.inputs(batch)
    return run_onnx(session, inputs), run_eager(graph, inputs)


def _assert_standard(path, input_names):
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    # every batch entry is a graph input: the exporter drops the inputs a graph does not read
    assert [i.name for i in model.graph.input] == list(input_names)


@pytest.mark.parametrize("name", CONFIGS_3D + CONFIGS_2D)
def test_graph_matches_pytorch_on_new_inputs(name, synth_root, tmp_path):
    cfg = _cfg(name, synth_root)
    graph, session = _exported(cfg, tmp_path / "model.onnx")
    _assert_standard(tmp_path / "model.onnx", graph.batch_names)
    if "detr3d" in name:
        assert any(n.op_type == "GridSample" for n in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    outputs = []
    for index in (0, 1):
        ort_out, eager = _run(graph, session, _batch(cfg, index))
        for n, a, b in zip(graph.output_names(), ort_out, eager):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"{name} {n} (batch {index})")
        outputs.append(ort_out)
    # a graph with a baked input would give the same outputs for both
    assert np.abs(outputs[0][0] - outputs[1][0]).max() > 1e-3
    # the batch axis is dynamic: one sample of the second batch
    ort_out, eager = _run(graph, session, _batch(cfg, 1, batch_size=1))
    assert ort_out[0].shape[0] == 1
    for a, b in zip(ort_out, eager):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def _rotated(lidar2img, yaw):
    """lidar2img (B, N, 4, 4) of a rig turned by `yaw` about LiDAR z."""
    turn = torch.tensor(transform_matrix(rotation=yaw_to_quaternion(yaw), inverse=True), dtype=lidar2img.dtype)
    return lidar2img @ turn


@pytest.mark.parametrize("name", CONFIGS_3D)
def test_camera_matrices_and_image_shapes_are_inputs(name, synth_root, tmp_path):
    cfg = _cfg(name, synth_root)
    graph, session = _exported(cfg, tmp_path / "model.onnx")
    batch = _batch(cfg, 1)
    base, _ = _run(graph, session, batch)
    H, W = batch["img_shape"][0]
    changed = {"lidar2img": {**batch, "lidar2img": _rotated(batch["lidar2img"], 0.3)},
               "img_shape": {**batch, "img_shape": [(H - 16, W - 48)] * len(batch["img_shape"])}}
    for what, other in changed.items():
        ort_out, eager = _run(graph, session, other)
        for n, a, b in zip(graph.output_names(), ort_out, eager):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"{name} {n} with another {what}")
        assert np.abs(ort_out[0] - base[0]).max() > 1e-3, f"{name}: {what} does not change the ONNX outputs"


def test_petr_padding_mask_is_not_baked(synth_root, tmp_path):
    """Traced on unpadded images (no padding mask needed), the graph still masks the padding of smaller ones."""
    cfg = load_config("petr_tiny_synth", [f"data.root={synth_root}", "data.version=v1.0-mini",
                                          "data.val_split=mini_val", "data.image_size=[64,192]"])
    graph, session = _exported(cfg, tmp_path / "model.onnx")
    batch = _batch(cfg, 1)
    assert tuple(batch["img_shape"][0]) == tuple(batch["img"].shape[-2:])
    ort_out, eager = _run(graph, session, {**batch, "img_shape": [(64, 160)] * 2})
    for a, b in zip(ort_out, eager):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["petr_tiny_synth", "detr3d_tiny_synth", "detr_tiny_shapes",
                                  "deformable_detr_tiny_shapes", "sparse_rcnn_tiny_shapes"])
def test_postprocess_in_graph(name, synth_root, tmp_path):
    """The core post-processor's top-k decoding in the graph (3D boxes, 2D pixels, softmax and focal classes)."""
    cfg = _cfg(name, synth_root)
    graph, session = _exported(cfg, tmp_path / "model.onnx", postprocess=True)
    _assert_standard(tmp_path / "model.onnx", graph.batch_names)
    assert graph.output_names() == ["scores", "labels", "boxes", "keep"]
    batch = _batch(cfg, 1)
    ort_out, eager = _run(graph, session, batch)
    names = graph.output_names()
    diffs = max_differences(names, ort_out, eager)
    assert max(diffs.values()) <= ATOL, diffs
    # most ranks are compared (only near-equal scores may swap), and the eager side is the post-processor's result
    assert unambiguous_ranks(eager[0]).mean() > 0.25
    k = ort_out[0].shape[1]
    assert 0 < k <= cfg.model.max_detections and ort_out[2].shape == (2, k, 9 if name in CONFIGS_3D else 4)
    with torch.no_grad():
        detections = graph.postprocess(graph.model(batch), batch)
    for det, scores, keep in zip(detections, eager[0], eager[3]):
        np.testing.assert_array_equal(det["scores"].numpy(), scores[keep])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("sampling_ratio, aligned", [(2, True), (2, False), (0, True)])
def test_roi_align_as_onnx_roialign(sampling_ratio, aligned, tmp_path):
    """Sparse R-CNN's multi-level RoIAlign as ONNX RoiAlign: traced with every box on one level, the graph pools
    each box from its own level when they spread out, with torchvision's semantics (adaptive grids included)."""
    from bev3d.ops.roi_align import multiscale_roi_align, roi_levels

    class Pool(nn.Module):
        def forward(self, f0, f1, f2, boxes):
            return multiscale_roi_align([f0, f1, f2], [8, 16, 32], boxes, 7, sampling_ratio, aligned)

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 8, 64 // s, 64 // s, generator=g) for s in (4, 8, 16)]

    def boxes(scale, n=10):
        xy = torch.rand(2, n, 2, generator=g) * 64
        return torch.cat([xy, xy + torch.rand(2, n, 2, generator=g) * scale + 1], -1)

    traced = boxes(4)  # all on the finest level: the other levels' features must still be graph inputs
    path = tmp_path / "roi.onnx"
    names = ["f0", "f1", "f2", "boxes"]
    torch.onnx.export(Pool(), (*feats, traced), str(path), dynamo=False, opset_version=17, input_names=names,
                      dynamic_axes={"boxes": {1: "boxes"}})
    assert "RoiAlign" in {n.op_type for n in onnx.load(str(path)).graph.node}
    session = onnx_session(path, threads=1)
    counts = []
    for b in (traced, boxes(900), boxes(400, n=3)):
        counts.append(np.bincount(roi_levels(b.reshape(-1, 4), [3, 4, 5]).numpy(), minlength=3))
        out = session.run(None, dict(zip(names, [t.numpy() for t in (*feats, b)])))[0]
        np.testing.assert_allclose(out, Pool()(*feats, b).numpy(), atol=1e-5, rtol=0)
    assert (counts[0][1:] == 0).all() and (counts[1] > 0).all()


class ToyStreaming(nn.Module):
    """A stand-in for a streaming 3D model: its memory, a running per-query state, mixes in every frame."""

    export_batch_keys = ("timestamp",)

    def __init__(self, queries=5, classes=3):
        super().__init__()
        self.mix = nn.Linear(3 + 16 + 1, queries * classes)
        self.queries, self.classes = queries, classes

    def export_memory(self, batch):
        return {"state": torch.zeros(batch["img"].shape[0], self.queries * self.classes)}

    def export_step(self, batch, memory):
        B = batch["img"].shape[0]
        x = torch.cat([batch["img"].mean((1, 3, 4)), batch["lidar2img"].mean(1).flatten(1),
                       batch["img_shape"][:, :1].float() / 100 + batch["timestamp"][:, None]], 1)
        state = 0.5 * memory["state"] + self.mix(x)
        logits = state.view(1, B, self.queries, self.classes)
        return SetPredictions(logits, logits.new_zeros(1, B, self.queries, 10)), {"state": state}


def test_memory_hook_carries_state_through_the_graph(tmp_path):
    """Three frames through ONNX with the memory carried by the caller equal three eager frames."""
    torch.manual_seed(0)
    graph = ExportGraph(ToyStreaming().eval(), "3d")
    g = torch.Generator().manual_seed(0)
    frames = [{"img": torch.randn(2, 6, 3, 8, 8, generator=g), "lidar2img": torch.randn(2, 6, 4, 4, generator=g),
               "img_shape": [(8, 8)] * 2, "timestamp": torch.full((2,), 0.5 * t)} for t in range(3)]
    inputs = graph.inputs(frames[0])
    assert list(inputs)[-2:] == ["timestamp", "memory.state"]
    assert graph.output_names() == ["logits", "boxes", "new_memory.state"]
    export_onnx(graph, inputs, tmp_path / "stream.onnx")
    session = onnx_session(tmp_path / "stream.onnx", threads=1)
    memory, eager_memory = inputs["memory.state"].numpy(), inputs["memory.state"]
    for frame in frames:
        inputs = graph.inputs(frame)
        feed = {k: v.numpy() for k, v in inputs.items()}
        logits, _, memory = session.run(None, {**feed, "memory.state": memory})
        with torch.no_grad():
            eager_logits, _, eager_memory = graph(*list(inputs.values())[:-1], eager_memory)
        np.testing.assert_allclose(logits, eager_logits.numpy(), atol=1e-5, rtol=0)
    assert np.abs(memory).max() > 0


@pytest.mark.parametrize("name", ["petr_tiny_synth", "detr_tiny_shapes"])
def test_fp16(name, synth_root, tmp_path):
    """--fp16: float16 weights, float32 inputs and outputs, close to the float32 model."""
    cfg = _cfg(name, synth_root)
    torch.manual_seed(0)
    graph = build_graph(cfg)
    export_onnx(graph, graph.inputs(_batch(cfg, 0)), tmp_path / "model16.onnx", fp16=True)
    model = onnx.load(str(tmp_path / "model16.onnx"))
    assert {t.data_type for t in model.graph.initializer if t.dims and len(t.raw_data or t.float_data) > 64} == \
        {onnx.TensorProto.FLOAT16}
    ort_out, eager = _run(graph, onnx_session(tmp_path / "model16.onnx", threads=1), _batch(cfg, 1))
    assert ort_out[0].dtype == np.float32
    np.testing.assert_allclose(ort_out[0], eager[0], atol=5e-2, rtol=0)
    assert np.abs(ort_out[0] - eager[0]).max() > 1e-5  # it is float16 inside


def test_cli_export_check(tmp_path, capsys):
    out = tmp_path / "detr.onnx"
    rc = main(["export", "--cfg", "detr_tiny_shapes", "--data-root", str(tmp_path / "absent"), "--out", str(out),
               "--batch", "2", "--postprocess", "--check", "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists(), text
    assert "max |onnxruntime - pytorch|" in text and "synthetic batch" in text and "latency" in text


def test_cli_errors(tmp_path, capsys):
    official = tmp_path / "official.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, official)
    args = ["export", "--cfg", "detr_tiny_shapes", "--out", str(tmp_path / "x.onnx")]
    assert main(args + ["--ckpt", str(official)]) == 2
    assert "is not a bev3d checkpoint" in capsys.readouterr().err
    assert main(args + ["--opset", "15"]) == 2
    assert "opset 16" in capsys.readouterr().err


def test_streampetr_three_frames_with_the_memory_carried_by_the_caller(synth_root, tmp_path):
    """The graph is traced on a scene's first frame (an empty memory); three frames through onnxruntime, each fed
    the previous frame's new_memory, equal three streaming frames of the stateful model, and the carried memory
    changes the outputs (a graph that baked in 'no memory' fails)."""
    from bev3d.data import build_dataset, collate
    from bev3d.data.streaming import scene_sequences

    cfg = load_config("streampetr_tiny_synth", [f"data.root={synth_root}", "data.version=v1.0-mini",
                                                "data.val_split=mini_val", "data.image_size=[64,176]"])
    torch.manual_seed(0)
    graph = build_graph(cfg)
    dataset = build_dataset(cfg, cfg.data.val_split)
    frames = [collate([dataset[i]]) for i in scene_sequences(dataset)[0][:3]]
    inputs = graph.inputs(frames[0])
    names = export_onnx(graph, inputs, tmp_path / "stream.onnx")
    memory_names = [n for n in names if n.startswith("new_memory.")]
    assert len(memory_names) == len(graph.memory_names) > 0
    session = onnx_session(tmp_path / "stream.onnx")
    model = graph.model
    model.reset_memory()
    memory = {k: v for k, v in inputs.items() if k.startswith("memory.")}
    for k, batch in enumerate(frames):
        with torch.no_grad():
            expected = model(batch)
        step = {**{n: v for n, v in graph.inputs(batch).items() if not n.startswith("memory.")}, **memory}
        out = dict(zip(names, run_onnx(session, step)))
        if k == 0:  # from the empty memory both runtimes order the queries alike
            np.testing.assert_allclose(out["logits"], expected.logits[-1].numpy(), atol=ATOL, rtol=0)
            np.testing.assert_allclose(out["boxes"], expected.boxes[-1].numpy(), atol=ATOL, rtol=0)
        else:  # the propagated queries come in the rank order of the previous frame's scores, which may swap where
            # two differ by less than the two runtimes' rounding
            assert_same_queries(out["logits"], out["boxes"], expected.logits[-1], expected.boxes[-1], atol=ATOL)
        if k > 0:  # the same frame from an empty memory differs: the graph did read the carried one
            fresh = dict(zip(names, run_onnx(session, graph.inputs(batch))))
            assert np.abs(fresh["logits"] - out["logits"]).max() > 1e-3, f"frame {k}: the memory had no effect"
        memory = {f"memory.{n[len('new_memory.'):]}": torch.from_numpy(out[n]) for n in memory_names}
