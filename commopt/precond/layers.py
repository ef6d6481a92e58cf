"""Layer statistics of ``nn.Linear`` and ``nn.Conv2d`` for MKOR's rank-1 factors (SPEC §7; paper
Algorithm 1 lines 2–3, "Rank-1 Approximation").

For a layer with weight gradient G (d_out × d_in, plus a bias column when the layer has a bias),
inputs a and output gradients δ over the *rows* of the batch:

* ā = mean over rows of a (the bias's input column of ones is appended by the caller, not sent);
* ḡ = mean over rows of (rows·δ) = Σ_rows δ: the mean per-row gradient of a mean loss.

Rows are the samples of a 2-D input, the tokens of a 3-D input (all leading dimensions), and for
``Conv2d`` the output positions of every sample: ā is then the mean of the unfolded input patches
(= the mean over samples of each sample's spatial mean) and ḡ the sum of δ over samples and
positions. Sums are accumulated in float32 (float64 for float64 layers) whatever the activation
dtype, so fp16/bf16 activations do not overflow or lose the small terms.

Capture (:func:`tap`): a forward hook replaces the layer's output y by ``_Tap(y)``, an identity
whose backward hands Σ_rows a, the row count and Σ_rows δ to three *probe* leaves as their
gradients. Autograd accumulates them like any gradient (micro-batches add up; a forward that
gets no backward contributes nothing), and the whole thing is ordinary traceable tensor code: no
Python hook runs in backward and no ``grad_fn`` is touched, so ``torch.compile`` captures it in
the model's graph without a break (SPEC §7; see the README's MKOR section).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["is_supported", "input_dim", "output_dim", "input_sum", "output_grad_sum", "grad_matrix",
           "write_grad", "acc_dtype", "Probes", "tap"]


def is_supported(module: nn.Module) -> bool:
    """``nn.Linear`` and ungrouped ``nn.Conv2d`` (and their subclasses): the layers MKOR preconditions.

    A grouped/depthwise ``Conv2d`` has no single Kronecker structure over its weight and passes
    through to the base optimizer.
    """
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def input_dim(module: nn.Module) -> int:
    """d_in without the bias column: ``in_features``, or C_in·k_h·k_w for ``Conv2d``."""
    if isinstance(module, nn.Linear):
        return module.in_features
    kh, kw = module.kernel_size
    return module.in_channels * kh * kw


def output_dim(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the statistics: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _patch_sum(module: nn.Conv2d, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Σ over samples and output positions of the unfolded input patches (C_in·k_h·k_w,), and the row count.

    Unfolding is linear, so the sum over samples is taken first (``unfold`` of Σ_n x_n): the memory
    is that of one sample's patches, not the batch's. Padding follows the layer's
    ``padding_mode`` (``F.pad`` with ``_reversed_padding_repeated_twice``, as ``Conv2d`` does).
    """
    if x.dim() == 3:  # unbatched input (C, H, W)
        x = x.unsqueeze(0)
    n = x.shape[0]
    xs = x.sum(0, dtype=dtype, keepdim=True)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        if mode == "constant":
            xs = F.pad(xs, pad, mode="constant", value=0.0)
        else:
            # a non-zero padding mode is not linear in x: pad every sample, then sum
            xs = F.pad(x.to(dtype), pad, mode=mode).sum(0, keepdim=True)
    cols = F.unfold(xs, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
    positions = cols.shape[-1]
    return cols[0].sum(-1), n * positions


def input_sum(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """(Σ_rows a, rows) for the input ``x`` of ``module`` (sums in :func:`acc_dtype`)."""
    dtype = acc_dtype(x.dtype)
    if isinstance(module, nn.Conv2d):
        return _patch_sum(module, x.detach(), dtype)
    a = x.detach().reshape(-1, x.shape[-1])
    return a.sum(0, dtype=dtype), a.shape[0]


def output_grad_sum(module: nn.Module, grad_out: Tensor) -> Tensor:
    """Σ_rows δ for the gradient ``grad_out`` of the layer's output (sums in :func:`acc_dtype`)."""
    dtype = acc_dtype(grad_out.dtype)
    if isinstance(module, nn.Conv2d):
        dims = (0, 2, 3) if grad_out.dim() == 4 else (1, 2)
        return grad_out.sum(dims, dtype=dtype)
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=dtype)


def _grad_sum(grad: Tensor, conv: bool, dtype: torch.dtype) -> Tensor:
    if conv:
        return grad.sum((0, 2, 3) if grad.dim() == 4 else (1, 2), dtype=dtype)
    return grad.reshape(-1, grad.shape[-1]).sum(0, dtype=dtype)


class Probes:
    """Three leaves whose gradients are a layer's statistics since they were last cleared:
    ``a.grad`` = Σ_rows a (d_in,), ``n.grad`` = the row count (0-dim), ``g.grad`` = Σ_rows δ (d_out,).

    ``a`` and ``g`` are in :func:`acc_dtype` of the layer's weight; the count is float64 (exact up
    to 2⁵³ rows; float32 on MPS, which has no float64)."""

    def __init__(self, module: nn.Module) -> None:
        w = module.weight
        dt = acc_dtype(w.dtype)
        ndt = torch.float32 if w.device.type == "mps" else torch.float64
        self.a = torch.zeros(input_dim(module), dtype=dt, device=w.device, requires_grad=True)
        self.g = torch.zeros(output_dim(module), dtype=dt, device=w.device, requires_grad=True)
        self.n = torch.zeros((), dtype=ndt, device=w.device, requires_grad=True)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.a, self.n, self.g

    def ready(self) -> bool:
        """True once a backward has reached the layer since the last :meth:`clear`."""
        return self.n.grad is not None and self.a.grad is not None and self.g.grad is not None

    def clear(self) -> None:
        self.a.grad = self.n.grad = self.g.grad = None


class _Tap(torch.autograd.Function):
    """y ↦ a copy of y; backward: δ passes through unchanged and the probes receive (Σ a, rows, Σ δ).

    The copy (not a view) keeps a later in-place op on y (``ReLU(inplace=True)``) legal."""

    @staticmethod
    def forward(ctx, out: Tensor, a_probe: Tensor, n_probe: Tensor, g_probe: Tensor, a_sum: Tensor,
                rows: int, conv: bool) -> Tensor:
        ctx.save_for_backward(a_sum)
        ctx.rows, ctx.conv, ctx.g_dtype, ctx.n_dtype = rows, conv, g_probe.dtype, n_probe.dtype
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (a_sum,) = ctx.saved_tensors
        g_sum = _grad_sum(grad, ctx.conv, ctx.g_dtype)
        rows = torch.full((), ctx.rows, dtype=ctx.n_dtype, device=a_sum.device)
        return grad, a_sum, rows, g_sum, None, None, None


def tap(module: nn.Module, x: Tensor, out: Tensor, probes: Probes) -> Tensor:
    """The layer's output ``out`` (for input ``x``) wrapped so that its backward adds this call's
    statistics to ``probes``' gradients (see :class:`Probes`); values and gradients of the model
    are unchanged."""
    a_sum, rows = input_sum(module, x)
    return _Tap.apply(out, *probes.tensors(), a_sum.to(probes.a.dtype), rows, isinstance(module, nn.Conv2d))


def grad_matrix(module: nn.Module, with_bias: bool) -> Tensor:
    """The weight gradient as a d_out × d_in matrix, with the bias gradient as an extra last column
    when ``with_bias`` (a missing bias gradient counts as zero)."""
    g = module.weight.grad.reshape(module.weight.shape[0], -1)
    if with_bias:
        gb = module.bias.grad
        if gb is None:
            gb = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        g = torch.cat([g, gb.reshape(-1, 1).to(g.dtype)], dim=1)
    return g


def write_grad(module: nn.Module, p: Tensor, with_bias: bool) -> None:
    """Write the preconditioned matrix ``p`` (layout of :func:`grad_matrix`) back into ``.grad``."""
    w = module.weight
    d_in = input_dim(module)
    w.grad.copy_(p[:, :d_in].reshape(w.shape))
    if with_bias and module.bias.grad is not None:
        module.bias.grad.copy_(p[:, d_in])
