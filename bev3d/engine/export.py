"""`bev3d export`: a config's model -> an ONNX file of standard operators (docs/export.md); with --check it
runs in onnxruntime on a sample and is compared with eager PyTorch.

The graph is traced (torch.onnx's TorchScript exporter: no onnxscript needed) at a fixed padded image size, the
sample's; the batch axis is dynamic. Multi-scale deformable attention and DETR3D's camera sampling export as
GridSample (the ms_deform_attn reference), PETR's lidar2img inverse as elementwise arithmetic.
"""

import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bev3d.config import cli_overrides, load_config
from bev3d.errors import Bev3dError

MIN_OPSET = 16  # GridSample


def require_onnx():
    """-> (onnx, onnxruntime), or a Bev3dError that says how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise Bev3dError(f"bev3d export needs onnx and onnxruntime ({e}): pip install -e '.[export]'.") from None
    return onnx, onnxruntime


def build_graph(cfg, ckpt=None, postprocess=False, cfg_name="CONFIG"):
    """Config (+ bev3d checkpoint) -> ExportGraph in eval mode; without `ckpt` the weights are the random init
    (or model.weights); `cfg_name` goes into the convert command of a non-bev3d checkpoint's error."""
    from bev3d.models import build_model, build_postprocess
    from bev3d.models.export import ExportGraph
    from bev3d.models.registry import MODELS

    model = build_model(cfg)
    if hasattr(model, "reset_memory") and not hasattr(model, "export_memory"):
        raise Bev3dError(f"model.type {cfg.model.type} carries a memory between frames and has no export hook yet "
                         f"(export_memory / export_step, bev3d/models/export.py); it cannot be exported.")
    if ckpt:
        from bev3d.engine.test import load_weights

        load_weights(model, ckpt, cfg_name)
    kind = MODELS[cfg.model.type].boxes
    return ExportGraph(model.eval(), kind, build_postprocess(cfg) if postprocess else None).eval()


def export_size_2d(cfg):
    """The padded (H, W) a 2D graph takes: the longest resized side, up to the pad divisor, on both axes."""
    d = max(cfg.data.pad_divisor, 1)
    side = -(-cfg.data.coco.max_size // d) * d
    return side, side


def pad_2d(batch, size):
    """A collated 2D batch -> the same batch padded (image zeros, mask True) to `size` (H, W)."""
    H, W = size
    h, w = batch["img"].shape[-2:]
    if h > H or w > W:
        raise Bev3dError(f"a {h}x{w} batch does not fit the export size {H}x{W} (data.coco.max_size).")
    img = F.pad(batch["img"], (0, W - w, 0, H - h))
    mask = F.pad(batch["mask"], (0, W - w, 0, H - h), value=True)
    return {**batch, "img": img, "mask": mask}


def synthetic_batch(cfg, batch_size, seed=0):
    """A batch of the config's shapes without its dataset: random images; 3D: the synthetic rig's real nuScenes
    calibration (bev3d.data.synthetic.rig) at data.image_size, padded as the pipeline pads."""
    g = torch.Generator().manual_seed(seed)
    B = batch_size
    if cfg.data.type == "coco":
        H, W = export_size_2d(cfg)
        mask = torch.zeros(B, H, W, dtype=torch.bool)
        mask[1::2, :, W * 3 // 4:] = True  # every second image narrower
        sizes = [(H, W if i % 2 == 0 else W * 3 // 4) for i in range(B)]
        return {"img": torch.randn(B, 3, H, W, generator=g), "mask": mask, "img_shape": sizes,
                "orig_size": [(2 * h, 2 * w) for h, w in sizes]}
    from bev3d.constants import CAMERAS
    from bev3d.data.synthetic.rig import LIDAR_RIG, RIG, scaled_intrinsics
    from bev3d.geometry import intrinsics_4x4, transform_matrix

    h, w = cfg.data.image_size
    d = max(cfg.data.pad_divisor, 1)
    lidar2ego = transform_matrix(*LIDAR_RIG)
    lidar2img = [intrinsics_4x4(scaled_intrinsics(cam, (w, h))) @ transform_matrix(*RIG[cam][:2], inverse=True)
                 @ lidar2ego for cam in CAMERAS]
    lidar2img = torch.tensor(np.stack(lidar2img), dtype=torch.float32)[None].repeat(B, 1, 1, 1)
    img = torch.randn(B, len(CAMERAS), 3, -(-h // d) * d, -(-w // d) * d, generator=g)
    return {"img": img, "lidar2img": lidar2img, "img_shape": [(h, w)] * B}


def sample_batch(cfg, batch_size, index=0):
    """Samples `index * batch_size ...` of the config's validation split when data.root exists (else
    synthetic_batch), collated; 2D batches padded to export_size_2d."""
    if not Path(cfg.data.root).exists():
        return synthetic_batch(cfg, batch_size, seed=index)
    from bev3d.data import build_dataset, collate_fn_for

    dataset = build_dataset(cfg, cfg.data.val_split)
    items = [dataset[(index * batch_size + i) % len(dataset)] for i in range(batch_size)]
    batch = collate_fn_for(cfg)(items)
    return pad_2d(batch, export_size_2d(cfg)) if cfg.data.type == "coco" else batch


def export_onnx(graph, inputs, path, opset=17, fp16=False):
    """Trace `graph` on `inputs` ({name: tensor}, from graph.inputs) into the ONNX file `path`; checks it with
    onnx.checker and refuses operators outside the standard domain. -> the output names.

    fp16: weights and activations in float16 (onnxruntime's converter; the inputs and outputs stay float32, and
    the nodes without float16 kernels in onnxruntime, e.g. TopK and Range, run in float32 between casts)."""
    onnx, _ = require_onnx()
    if opset < MIN_OPSET:
        raise Bev3dError(f"--opset {opset}: the graph needs GridSample, which is opset {MIN_OPSET} or later.")
    outputs = graph.output_names()
    names = list(inputs)
    with warnings.catch_warnings(), torch.no_grad():
        # the deprecation notice of the TorchScript exporter, and the tracer's notes on shapes read as Python
        # numbers: the image size and the levels are fixed in the graph by design
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(graph, tuple(inputs.values()), str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in names + outputs})
    model = onnx.load(str(path))
    if fp16:
        model = to_float16(model)
        onnx.save(model, str(path))
    onnx.checker.check_model(model)
    custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise Bev3dError(f"{path} has operators of the custom domain(s) {custom}; bev3d exports standard ONNX only.")
    return outputs


def to_float16(model):
    """A float32 ONNX model -> float16 inside, float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(model, keep_io_types=True)
    # the converter appends the casts it adds after the nodes that read them; onnx.checker wants them before
    nodes = topological_order(model.graph)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _reads(node):
    """The names a node reads, with those its subgraphs (Loop, If bodies) read from the enclosing graph."""
    from onnx import AttributeProto

    names = set(node.input)
    for attr in node.attribute:
        for g in [attr.g] if attr.type == AttributeProto.GRAPH else attr.graphs:
            inner = {v.name for v in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
            names |= set().union(*(_reads(n) for n in g.node)) - inner
    return names - {""}


def topological_order(graph):
    """The graph's nodes, each after the nodes whose outputs it reads (a stable sort: ordered nodes keep their
    places)."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    pending, ordered = [(n, _reads(n)) for n in graph.node], []
    while pending:
        waiting = []
        for node, reads in pending:
            if reads <= known:
                ordered.append(node)
                known.update(node.output)
            else:
                waiting.append((node, reads))
        if len(waiting) == len(pending):
            raise Bev3dError(f"the float16 graph reads values no node writes (first: {waiting[0][0].name}).")
        pending = waiting
    return ordered


def onnx_session(path, threads=None):
    """onnxruntime CPU session of `path`; `threads`: intra-op threads (None: onnxruntime's default)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: not its notes on the graph optimisations it skips
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs):
    """{name: tensor} -> list of numpy outputs, in the graph's output order."""
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


def run_eager(graph, inputs):
    with torch.no_grad():
        return [t.numpy() for t in graph(*inputs.values())]


def unambiguous_ranks(scores, gap=1e-5):
    """(B, k) descending scores -> (B, k) True where rounding cannot reorder a detection: its score is more than
    `gap` from both neighbours' (the last rank is never sure: it may swap with the first one left out)."""
    apart = np.abs(np.diff(scores.astype(np.float64), axis=1)) > gap  # (B, k - 1)
    sure = np.ones(scores.shape, dtype=bool)
    sure[:, 1:] &= apart
    sure[:, :-1] &= apart
    sure[:, -1] = False
    return sure


def max_differences(names, onnx_outputs, eager_outputs, gap=1e-5):
    """{output name: max abs difference} (booleans and integers as numbers). A post-processed graph's labels,
    boxes and keep are compared at its unambiguous_ranks(gap) only: near-equal scores may come out in either
    order."""
    sure = unambiguous_ranks(eager_outputs[names.index("scores")], gap) if "scores" in names else None
    diffs = {}
    for name, a, b in zip(names, onnx_outputs, eager_outputs):
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        if sure is not None and name in ("labels", "boxes", "keep"):
            diff = diff[sure]
        diffs[name] = float(diff.max()) if diff.size else 0.0
    return diffs


def latency(fn, repeats=5):
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check(graph, path, inputs, threads=None, repeats=5, gap=1e-5):
    """Run `path` in onnxruntime and `graph` eagerly on `inputs` -> {"max_diff": {output: float}, "onnx_s",
    "eager_s": median seconds per batch}; `gap`: see max_differences."""
    session = onnx_session(path, threads)
    names = graph.output_names()
    eager = run_eager(graph, inputs)
    result = {"max_diff": max_differences(names, run_onnx(session, inputs), eager, gap)}
    if "scores" in names:
        result["ranks_compared"] = float(unambiguous_ranks(eager[names.index("scores")], gap).mean())
    return {**result, "onnx_s": latency(lambda: run_onnx(session, inputs), repeats),
            "eager_s": latency(lambda: run_eager(graph, inputs), repeats)}


def main(args):
    cfg = load_config(args.cfg, cli_overrides(args))
    if args.batch < 1:
        raise Bev3dError(f"--batch must be at least 1, got {args.batch}.")
    cfg_name = " ".join([args.cfg] + (["--opts", *args.opts] if args.opts else []))  # for the convert command
    graph = build_graph(cfg, args.ckpt, args.postprocess, cfg_name)
    inputs = graph.inputs(sample_batch(cfg, args.batch))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs = export_onnx(graph, inputs, out, args.opset, args.fp16)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    notes = [f"opset {args.opset}"] + (["float16"] if args.fp16 else [])
    notes += [] if args.ckpt or cfg.model.weights else ["random weights: no --ckpt"]
    print(f"wrote {out} ({', '.join(notes)})\n  inputs: {shapes}\n  outputs: {', '.join(outputs)}")
    if args.check:
        if args.threads:
            torch.set_num_threads(args.threads)
        # another sample than the one traced: a graph with a baked input would differ on it
        inputs = graph.inputs(sample_batch(cfg, args.batch, index=1))
        source = f"{cfg.data.root} ({cfg.data.val_split})" if Path(cfg.data.root).exists() else "a synthetic batch"
        # float16 scores are off by ~1e-4: only detections further apart keep their rank for sure
        result = check(graph, out, inputs, args.threads, gap=1e-3 if args.fp16 else 1e-5)
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in result["max_diff"].items())
        if "ranks_compared" in result:
            diffs += f" (labels, boxes, keep at the {result['ranks_compared']:.0%} of ranks no near-tie can swap)"
        print(f"check on {args.batch} sample(s) of {source}: max |onnxruntime - pytorch|: {diffs}\n"
              f"  latency per batch: onnxruntime {result['onnx_s'] * 1e3:.1f} ms, "
              f"pytorch {result['eager_s'] * 1e3:.1f} ms")
    return 0
