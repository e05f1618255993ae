"""SCAFFOLD's client side over a PEFT delta (Karimireddy et al. 2020, Algorithm 1).

Each local step moves the trainable tensors y by the optimizer's step on the local
gradient and then by -lr * (c - c_i), the drift correction (server control variate c
minus the client's own c_i). After K steps the client's new control variate is option
II of the paper, c_i+ = c_i - c + (x - y) / (K * lr), x being the global delta it started
from; what this module returns is the mean step m = (x - y) / (K * lr), from which
`fedpeft.common.protocol.control_variates` forms c_i+ and the reply's c_i+ - c_i = m - c.

With plain SGD (`training.optimizer = "sgd"`) the two updates are the paper's
(y <- y - lr (g - c_i + c), g after gradient clipping), m = mean(g) + c - c_i, and c_i+ is
the mean of the uncorrected gradients along the local path. With AdamW (the default) the
correction is applied as a separate SGD-style step after each AdamW step (what
OpenFedLLM's SCAFFOLD does), and m is the mean AdamW step in units of the learning rate,
so c and c_i measure drift in the same units the correction is applied in.

Written by hand: no maintained library implements SCAFFOLD for torch parameters
(Flower ships no SCAFFOLD strategy).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from fedpeft.common.errors import ConfigError
from fedpeft.common.protocol.deltas import DeltaSpec, TensorSpec


def control_spec(spec: DeltaSpec) -> DeltaSpec:
    """The shape of a control variate for deltas of `spec`: the same tensors, in float32
    (whatever dtype a tensor trains in, its control variate is a float32 mean)."""
    return DeltaSpec(OrderedDict((n, TensorSpec(s.shape, torch.float32)) for n, s in spec.tensors.items()))


class DriftCorrection:
    """Applies c - c_i after every optimizer step and measures the mean step (see module doc)."""

    def __init__(self, named_params: Mapping[str, nn.Parameter], correction: Mapping[str, torch.Tensor],
                 learning_rate: float, spec: DeltaSpec) -> None:
        control_spec(spec).validate(correction, source="drift correction (c - c_i)")
        if not learning_rate > 0:
            raise ConfigError(f"SCAFFOLD needs a learning rate > 0, got {learning_rate}")
        self.params = OrderedDict((n, named_params[n]) for n in spec.tensors)
        # Frozen tensors of the delta (FFA-LoRA's A) never move: no correction, mean step 0.
        self.correction = {n: correction[n].to(p.device, p.dtype) for n, p in self.params.items() if p.requires_grad}
        self.learning_rate = learning_rate
        self.start = {n: p.detach().to(torch.float64, copy=True) for n, p in self.params.items()}
        self.steps = 0

    @torch.no_grad()
    def after_step(self) -> None:
        """y <- y - lr * (c - c_i), after the optimizer's own step."""
        for name, corr in self.correction.items():
            self.params[name].sub_(corr, alpha=self.learning_rate)
        self.steps += 1

    def mean_step(self) -> OrderedDict[str, torch.Tensor]:
        """m = (x - y) / (K * lr) per tensor, float32 (zeros before any step)."""
        scale = 1.0 / (max(self.steps, 1) * self.learning_rate)
        return OrderedDict((n, ((self.start[n] - p.detach().to(torch.float64)) * scale).to(torch.float32).cpu())
                           for n, p in self.params.items())
