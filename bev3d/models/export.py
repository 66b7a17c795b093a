"""A model as a graph of named tensors, for `bev3d export` (docs/export.md): the collated batch becomes
graph inputs, SetPredictions the last decoder layer's outputs.

Graph inputs, by the box kind of the model table:
  3d: img (B, N, 3, H, W), lidar2img (B, N, 4, 4), img_shape (B, 2) valid (H, W); the padded size is img's.
  2d: img (B, 3, H, W), mask (B, H, W) True at padding; with post-processing also orig_size (B, 2) (H, W),
      the size the boxes are decoded to.
Outputs: logits (B, Q, K), boxes (B, Q, D); with post-processing instead the core post-processor's fixed-size
top-k: scores (B, k), labels (B, k), boxes (B, k, 4 | 9) and keep (B, k) (False where the coder or the score
threshold drops a detection; `bev3d test` removes those).

A model with state between frames (StreamPETR) exports it explicitly, through three members:

  export_batch_keys                  batch entries it reads beyond the ones above (e.g. timestamps, ego poses)
  export_memory(batch) -> {name: tensor}                          the memory before the first frame
  export_step(batch, memory) -> (SetPredictions, {name: tensor})  one frame: its predictions and new memory

The graph then has the inputs `memory.<name>` after the batch's and the outputs `new_memory.<name>` after the
predictions; the caller feeds each frame's new memory to the next frame.
"""

import torch
import torch.nn as nn

from bev3d.errors import Bev3dError

GRAPH_INPUTS = {"3d": ("img", "lidar2img", "img_shape"), "2d": ("img", "mask")}
PREDICTIONS = ("logits", "boxes")
DETECTIONS = ("scores", "labels", "boxes", "keep")


class ExportGraph(nn.Module):
    """model (eval mode) -> forward(*inputs in the order of `inputs(batch)`) -> outputs as `output_names()`.

    kind: "2d" | "3d" (the model table's boxes); postprocess: a core PostProcess to put in the graph, or None.
    """

    def __init__(self, model, kind, postprocess=None):
        super().__init__()
        self.model, self.postprocess = model, postprocess
        self.batch_names = GRAPH_INPUTS[kind] + (("orig_size",) if kind == "2d" and postprocess else ())
        self.batch_names += tuple(getattr(model, "export_batch_keys", ()))
        self.stateful = hasattr(model, "export_memory")
        self.memory_names = []

    def inputs(self, batch):
        """Collated batch -> {name: tensor}, the graph's inputs (img_shape and orig_size as int64 (B, 2))."""
        named = {}
        for name in self.batch_names:
            if name not in batch:
                raise Bev3dError(f"the batch has no {name!r}, an input of the {type(self.model).__name__} graph "
                                 f"(its export_batch_keys): export it on a sample of its dataset (data.root).")
            value = batch[name]
            if name in ("img_shape", "orig_size"):
                value = torch.as_tensor(value, dtype=torch.int64).view(-1, 2)
            named[name] = torch.as_tensor(value)
        memory = self.model.export_memory(batch) if self.stateful else {}
        self.memory_names = list(memory)
        named.update({f"memory.{k}": v for k, v in memory.items()})
        return named

    def output_names(self):
        return list(DETECTIONS if self.postprocess else PREDICTIONS) + [f"new_memory.{k}" for k in self.memory_names]

    def forward(self, *tensors):
        batch = dict(zip(self.batch_names, tensors))
        if self.stateful:
            memory = dict(zip(self.memory_names, tensors[len(self.batch_names):]))
            out, memory = self.model.export_step(batch, memory)
        else:
            out, memory = self.model(batch), {}
        logits, boxes = out.logits[-1], out.boxes[-1]  # (B, Q, K), (B, Q, D)
        if self.postprocess is None:
            results = (logits, boxes)
        else:
            results = self.postprocess.select(logits, boxes, batch)
        return (*results, *(memory[k] for k in self.memory_names))
