"""Reference BatchNorm and LayerNorm, written out from the textbook steps.

These modules exist to be read and to be held against ``torch.nn.BatchNorm{1,2,3}d`` and
``torch.nn.LayerNorm`` in tests: every statistic is computed with plain tensor arithmetic
(a mean is a sum divided by a count, a variance is the mean of squared deviations), so the
formula is visible in the code rather than hidden in a fused kernel.

Promises:

* ``ReferenceBatchNorm`` has the same constructor arguments, parameter and buffer names
  (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) and
  the same train/eval semantics as torch's BatchNorm, so ``load_state_dict`` works in both
  directions and outputs agree to floating-point rounding.
* ``ReferenceLayerNorm`` has the same constructor arguments and parameter names as
  ``torch.nn.LayerNorm`` and behaves identically in train and eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ReferenceBatchNorm",
    "ReferenceLayerNorm",
    "batch_norm_train_stats",
    "layer_norm_stats",
]


def _mean_over(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, int]:
    """Return ``(sum(x over dims) / count, count)`` with the reduced dims kept (size 1).

    Keeping the dims lets the result broadcast straight back against ``x``.
    """
    count = math.prod(x.shape[d] for d in dims)
    return x.sum(dim=dims, keepdim=True) / count, count


def batch_norm_train_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel batch statistics of ``x`` with shape ``(N, C, *spatial)``.

    Statistics are taken over every axis except the channel axis 1, i.e. over
    ``n = N * prod(spatial)`` values per channel.

    Returns ``(mean, biased_var, unbiased_var)``, each of shape ``(C,)``:

    * ``mean = sum(x) / n``
    * ``biased_var = sum((x - mean) ** 2) / n`` (used to normalize the batch)
    * ``unbiased_var = biased_var * n / (n - 1)`` (Bessel's correction; what the running
      variance accumulates, as an estimate of the population variance). Requires ``n > 1``.

    Raises ``ValueError`` if ``x`` has fewer than 2 dims or ``n <= 1``.
    """
    if x.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, *spatial), got {tuple(x.shape)}")
    dims = (0, *range(2, x.dim()))
    mean, n = _mean_over(x, dims)
    if n <= 1:
        # With one value per channel the batch variance is exactly 0 (x - mean == 0), so the
        # output would be just beta whatever the input, and the unbiased variance divides by
        # n - 1 = 0. Same check and wording as torch, plus the reason.
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{x.size()} (with one value per channel the batch variance is 0, so every "
            "output equals the bias, and the unbiased variance n/(n-1) is undefined)"
        )
    deviation = x - mean
    biased_var, _ = _mean_over(deviation * deviation, dims)
    biased_var = biased_var.reshape(-1)
    unbiased_var = biased_var * (n / (n - 1))
    return mean.reshape(-1), biased_var, unbiased_var


def layer_norm_stats(x: Tensor, num_normalized_dims: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over its last ``num_normalized_dims`` dims.

    Both results keep the reduced dims (size 1) so they broadcast against ``x``. Every
    leading index gets its own statistics: one sample never sees another.
    """
    if num_normalized_dims < 1 or num_normalized_dims > x.dim():
        raise ValueError(
            f"cannot normalize over the last {num_normalized_dims} dims of an input "
            f"of shape {tuple(x.shape)}"
        )
    dims = tuple(range(x.dim() - num_normalized_dims, x.dim()))
    mean, _ = _mean_over(x, dims)
    deviation = x - mean
    biased_var, _ = _mean_over(deviation * deviation, dims)
    return mean, biased_var


def _channel_view(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` to ``(1, C, 1, ...)`` to broadcast over an
    ``ndim``-dimensional ``(N, C, *spatial)`` input."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


class ReferenceBatchNorm(nn.Module):
    """Batch normalization over channel axis 1 of ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``
    or ``(N, C, D, H, W)`` inputs; a drop-in for ``torch.nn.BatchNorm{1,2,3}d``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel, where ``mean`` and
    ``var`` are

    * the batch mean and biased batch variance when training, or whenever
      ``track_running_stats=False`` (then there is nothing else to use, even in eval mode);
    * ``running_mean`` and ``running_var`` in eval mode when tracking.

    When training with tracking, each forward pass also does (without autograd)::

        num_batches_tracked += 1
        f = momentum, or 1 / num_batches_tracked if momentum is None  (cumulative average)
        running_mean = (1 - f) * running_mean + f * batch_mean
        running_var  = (1 - f) * running_var  + f * unbiased_batch_var

    Parameters and buffers carry torch's names, and are ``None`` exactly where torch's are,
    so state dicts move between this module and torch's in both directions.
    """

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))
            self.bias = nn.Parameter(torch.empty(num_features))
        else:
            # Registered as None (not left unset) so the attribute exists, as in torch.
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            # Integer counter, like torch's: it counts steps and feeds momentum=None.
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0 (torch's initial values)."""
        if self.track_running_stats:
            assert self.running_mean is not None
            assert self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, and set weight to 1 and bias to 0 (the identity)."""
        self.reset_running_stats()
        if self.affine:
            assert self.weight is not None and self.bias is not None
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def _check_input(self, x: Tensor) -> None:
        if not 2 <= x.dim() <= 5:
            raise ValueError(
                "expected an input of shape (N, C), (N, C, L), (N, C, H, W) or "
                f"(N, C, D, H, W), got {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis 1, got input size {x.size()}"
            )

    def _update_running_stats(self, batch_mean: Tensor, unbiased_var: Tensor) -> None:
        assert self.running_mean is not None
        assert self.running_var is not None
        assert self.num_batches_tracked is not None
        # The running statistics are bookkeeping, not part of the computation graph.
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                # Cumulative moving average: after k batches every batch has weight 1/k.
                factor = 1.0 / float(self.num_batches_tracked.item())
            else:
                factor = self.momentum
            new_mean = (1 - factor) * self.running_mean + factor * batch_mean
            new_var = (1 - factor) * self.running_var + factor * unbiased_var
            self.running_mean.copy_(new_mean)
            self.running_var.copy_(new_var)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` per channel; see the class docstring for which statistics."""
        self._check_input(x)
        # The steps run in float64 and the result is rounded once to the input's dtype: a
        # reference should not add rounding of its own, so what remains is torch's.
        x64 = x.to(torch.float64)
        # Like torch: without running statistics, batch statistics are used even in eval.
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            mean, var, unbiased_var = batch_norm_train_stats(x64)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean.detach(), unbiased_var.detach())
        else:
            assert self.running_mean is not None and self.running_var is not None
            mean, var = self.running_mean.to(torch.float64), self.running_var.to(torch.float64)

        ndim = x.dim()
        x_hat = (x64 - _channel_view(mean, ndim)) / torch.sqrt(_channel_view(var, ndim) + self.eps)
        if self.affine:
            assert self.weight is not None and self.bias is not None
            gamma = _channel_view(self.weight.to(torch.float64), ndim)
            beta = _channel_view(self.bias.to(torch.float64), ndim)
            x_hat = x_hat * gamma + beta
        return x_hat.to(x.dtype)


class ReferenceLayerNorm(nn.Module):
    """Layer normalization over the trailing ``normalized_shape`` dims; a drop-in for
    ``torch.nn.LayerNorm``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` where ``mean`` and the biased
    ``var`` are taken separately for each leading index over the trailing dims, so a
    sample's output never depends on the other samples in its batch, and train and eval
    mode compute the same thing (there are no running statistics).

    ``weight`` and ``bias`` have shape ``normalized_shape``; they are ``None`` when
    ``elementwise_affine=False``, and ``bias`` is ``None`` when ``bias=False``, as in torch.
    """

    weight: Tensor | None
    bias: Tensor | None

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape: tuple[int, ...] = tuple(normalized_shape)
        if not self.normalized_shape:
            raise ValueError("normalized_shape must name at least one dimension")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set weight to 1 and bias to 0 (the identity affine map)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        affine = self.elementwise_affine
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={affine}"

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` over its trailing ``normalized_shape`` dims."""
        k = len(self.normalized_shape)
        if x.dim() < k or tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(
                f"expected an input whose trailing dims are {self.normalized_shape}, "
                f"got input size {x.size()}"
            )
        # float64 steps, rounded once to the input's dtype (see ReferenceBatchNorm.forward).
        x64 = x.to(torch.float64)
        mean, var = layer_norm_stats(x64, k)
        y = (x64 - mean) / torch.sqrt(var + self.eps)
        # weight/bias have shape normalized_shape, which broadcasts against the trailing dims.
        if self.weight is not None:
            y = y * self.weight.to(torch.float64)
        if self.bias is not None:
            y = y + self.bias.to(torch.float64)
        return y.to(x.dtype)
