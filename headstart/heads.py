"""The new head put on top of a cut: linear or MLP, with its initialisation as a parameter.

Constant initialisations (zeros, ones) are allowed on purpose: every unit of a layer then gets
the same gradient, so the units never become different (the symmetry the notes warn about).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from headstart.config import HeadParams


def make_head(in_shape: Sequence[int], num_classes: int, params: HeadParams) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden size -> Linear(num_classes)."""
    width = math.prod(in_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for hidden in params.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if params.dropout > 0:
            layers.append(nn.Dropout(params.dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    head = nn.Sequential(*layers)
    init_head(head, params.init)
    return head


def init_head(head: nn.Module, init: str) -> None:
    """Initialise every Linear layer's weights (biases start at zero)."""
    for layer in head.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if init == "kaiming":
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
        elif init == "xavier":
            nn.init.xavier_uniform_(layer.weight)
        elif init == "zeros":
            nn.init.zeros_(layer.weight)
        elif init == "ones":
            nn.init.ones_(layer.weight)
        else:
            raise ValueError(f"unknown head init {init!r}; expected kaiming, xavier, zeros or ones")
        nn.init.zeros_(layer.bias)
