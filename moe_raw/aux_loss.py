"""``MoEAuxLossAutoScaler``: Megatron / NeMo Automodel's way to put an auxiliary (load-balancing) loss into the
backward pass of the main loss without adding it to the loss value."""

from __future__ import annotations

import torch


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """``MoEAuxLossAutoScaler.apply(output [T, H], aux_loss)`` returns ``output`` unchanged. In backward, ``output``
    gets its gradient and ``aux_loss`` (a scalar, or any shape) gets ``main_loss_backward_scale`` in its own shape
    (a 0-d tensor, 1 until set: the class attribute NeMo Automodel's and Megatron's training loops set to their loss
    scale), so the aux loss's graph (the router) receives its gradient. As in the package, ``aux_loss`` is kept as
    fp32 for backward."""

    main_loss_backward_scale: torch.Tensor | None = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor):
        ctx.save_for_backward(aux_loss.float())
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        if MoEAuxLossAutoScaler.main_loss_backward_scale is None:
            MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0, device=aux_loss.device)
        return grad_output, torch.ones_like(aux_loss) * MoEAuxLossAutoScaler.main_loss_backward_scale
