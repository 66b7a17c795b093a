import pytest
import torch

from bev3d.models.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou)


def test_conversions_roundtrip_and_values():
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(b), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    x = torch.rand(10, 4)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(x)), x)


def test_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0],  # overlap 1, union 7, hull 9
                      [3.0, 0.0, 4.0, 1.0],  # disjoint: union 5, hull 4*2=8
                      [0.0, 0.0, 2.0, 2.0]])  # identical
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0, 1.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 5.0, 4.0]]))
    giou = generalized_box_iou(a, b)
    torch.testing.assert_close(giou, torch.tensor([[1 / 7 - 2 / 9, 0.0 - 3 / 8, 1.0]]))


def test_giou_rejects_inverted_boxes():
    with pytest.raises(ValueError):
        generalized_box_iou(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
