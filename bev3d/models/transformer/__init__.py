"""Transformer building blocks shared by the 2D (DETR, Deformable DETR) and 3D (PETR, DETR3D) heads."""

from bev3d.models.transformer.attention import MultiheadAttention
from bev3d.models.transformer.deformable_transformer import (DeformableDecoder, DeformableDecoderLayer,
                                                             DeformableEncoder, DeformableEncoderLayer,
                                                             DeformableTransformer, MSDeformAttn)
from bev3d.models.transformer.detr_transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer,
                                                       TransformerEncoder, TransformerEncoderLayer)
from bev3d.models.transformer.position_encoding import (PositionEmbeddingLearned, PositionEmbeddingSine,
                                                        build_position_encoding)
from bev3d.models.transformer.utils import FFN, MLP, inverse_sigmoid

__all__ = [
    "MultiheadAttention", "MSDeformAttn", "DeformableEncoder", "DeformableEncoderLayer", "DeformableDecoder",
    "DeformableDecoderLayer", "DeformableTransformer", "Transformer", "TransformerEncoder",
    "TransformerEncoderLayer", "TransformerDecoder", "TransformerDecoderLayer", "PositionEmbeddingSine",
    "PositionEmbeddingLearned", "build_position_encoding", "FFN", "MLP", "inverse_sigmoid",
]
