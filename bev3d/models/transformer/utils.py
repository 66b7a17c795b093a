"""Small shared pieces of the transformer heads."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class FFN(nn.Module):
    """Post-norm feed-forward block: norm(x + dropout(linear2(dropout(relu(linear1(x))))))."""

    def __init__(self, embed_dims, ffn_dims, dropout=0.1):
        super().__init__()
        self.linear1 = nn.Linear(embed_dims, ffn_dims)
        self.linear2 = nn.Linear(ffn_dims, embed_dims)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x):
        return self.norm(x + self.dropout2(self.linear2(self.dropout1(F.relu(self.linear1(x))))))


def inverse_sigmoid(x, eps=1e-5):
    """logit(x) with x clamped to [0, 1] and both terms to >= eps (finite at 0 and 1)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
