"""COCO box AP with pycocotools' COCOeval (the official COCO metric)."""

import contextlib
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")


class CocoEvaluator:
    """Collects detections image by image, then scores them against an annotation file."""

    def __init__(self, ann_file, verbose=False):
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco_gt = COCO(str(ann_file))
        self.verbose = verbose
        self.results = []
        self.image_ids = []

    def update(self, image_ids, detections):
        """image_ids: list of int; detections: the model's eval output (boxes xyxy in original-image pixels)."""
        for image_id, det in zip(image_ids, detections):
            self.image_ids.append(int(image_id))
            boxes = det["boxes"].detach().cpu().double().numpy()
            for (x0, y0, x1, y1), score, label in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
                self.results.append({"image_id": int(image_id), "category_id": int(label),
                                     "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})

    def summarize(self):
        """-> {"AP": ..., "AP50": ..., ...} over the images seen by update (zeros when nothing was detected;
        size-range entries without ground truth are absent)."""
        if not self.results:
            return dict.fromkeys(STAT_NAMES, 0.0)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            coco_dt = self.coco_gt.loadRes(self.results)
            ev = COCOeval(self.coco_gt, coco_dt, "bbox")
            ev.params.imgIds = sorted(set(self.image_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if self.verbose:
            print(out.getvalue(), end="")
        # COCOeval reports -1 where a size range has no ground truth: such entries are left out.
        return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats) if v >= 0}
