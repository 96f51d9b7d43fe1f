"""Activation-lean RMSNorm and SwiGLU for training: the same numbers, fewer tensors kept for the backward pass.

Autograd keeps every intermediate of an element-wise chain that a later gradient needs. In a Llama-style
block, `weight * (x * rsqrt(mean(x²) + ε))` keeps x, the normalised x and the rsqrt; `silu(g) * u` keeps g,
silu(g) and u. Both backward passes can be written from fewer saved tensors, recomputing the cheap rest:
RMSNorm from x and the rsqrt (one number per row), SwiGLU from g and u, and with a plain down projection
(full fine-tuning) the product silu(g) · u that it would keep as its input too. Per token and layer of the
built-in model that is 2·576 + 2·1536 floats fewer than 11.7k, a third of the activations, for a few
element-wise ops more in the backward pass; the matmuls are untouched. Liger Kernel does the same with Triton kernels on a GPU;
these are plain PyTorch, so they run wherever the model does.

`lean_activations(model)` swaps the forward of the norms and MLPs of known model families (the same formula
as `transformers`: weight · x̂, SiLU gate) and leaves any other module as it is. LoRA layers inside the MLP
still run as themselves: only the activation between them changes.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# Families whose RMSNorm is weight · x / rms(x) (not Gemma's (1 + weight)) and whose MLP is
# down(act(gate(x)) · up(x)).
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm"}
GATED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(_at_least_fp32(x.dtype))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = (grad * weight).to(rstd.dtype)
        # d/dx of x·r with r = (mean(x²) + ε)^(-1/2): r·(g − x̂·mean(g·x̂)), x̂ = x·r.
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        # silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
        return grad * up * sigmoid * (1 + gate * (1 - sigmoid)), grad * silu


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) · up) for a plain down projection: its input is recomputed, not kept."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ (silu * up).reshape(-1, up.shape[-1])
        grad_product = grad @ weight
        return grad_product * up * sigmoid * (1 + gate * (1 - sigmoid)), grad_product * silu, grad_weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / sqrt(mean(x²) + ε), computed in fp32 and cast back, keeping only x and 1/rms for backward."""
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, keeping only gate and up for backward."""
    return _SwiGLU.apply(gate, up)


def _norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    # A plain down projection (not a LoRA layer, outside autocast, whose backward runs in other dtypes) takes
    # the product into the same function, so the product is not kept either. Without a backward to come there
    # is nothing to keep, and the module runs as it is (a packed weight of `generation.packed_linears`).
    if (
        torch.is_grad_enabled() and type(down) is torch.nn.Linear and down.bias is None
        and not torch.is_autocast_enabled(x.device.type)
    ):  # fmt: skip
        return _SwiGLUDown.apply(gate, up, down.weight)
    return down(swiglu(gate, up))


def lean_activations(model: torch.nn.Module) -> int:
    """Swap in the lean RMSNorm and SwiGLU where a module is of a known family; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
            swapped += 1
        elif name in GATED_MLPS and getattr(getattr(module, "config", None), "hidden_act", None) == "silu":
            module.forward = types.MethodType(_mlp_forward, module)
            swapped += 1
    return swapped
