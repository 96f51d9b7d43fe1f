"""Activation-lean RMSNorm and SwiGLU: their gradients by finite differences, the same model outputs and
gradients as transformers' own modules, and fewer tensors kept for the backward pass."""

from __future__ import annotations

import torch

from alignkit.fused import lean_activations, rms_norm, swiglu
from alignkit.models import TINY_LLAMA, load_model


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, 1e-6), (x, weight))
    gate, up = (torch.randn(3, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    expected = weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), expected)
    torch.testing.assert_close(swiglu(gate, up), gate * torch.sigmoid(gate) * up)


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the activations autograd keeps for one forward pass (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).logits.sum().backward()
    return sum(kept.values())


def test_lean_model_gives_transformers_outputs_and_gradients_from_fewer_saved_tensors():
    plain, lean = load_model(TINY_LLAMA), load_model(TINY_LLAMA)
    layers = plain.config.num_hidden_layers
    assert lean_activations(lean) == 3 * layers + 1  # two norms and an MLP per layer, and the final norm
    ids = torch.randint(0, plain.config.vocab_size, (2, 11))
    a, b = plain(ids).logits, lean(ids).logits
    torch.testing.assert_close(b, a)
    for p, q in zip(torch.autograd.grad(a.square().sum(), list(plain.parameters())), torch.autograd.grad(b.square().sum(), list(lean.parameters()))):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-4)
    # Per token and layer, the normalised x of both norms, silu(gate) and the down projection's input are no
    # longer kept.
    hidden, inner = plain.config.hidden_size, plain.config.intermediate_size
    fewer = saved_bytes(plain, ids) - saved_bytes(lean, ids)
    assert fewer >= 0.9 * ids.numel() * layers * (2 * hidden + 2 * inner) * 4, fewer


def test_lean_mlp_under_lora_keeps_the_adapters_and_their_gradients():
    from peft import LoraConfig, get_peft_model

    def lora_model(lean: bool) -> torch.nn.Module:
        model = load_model(TINY_LLAMA)
        if lean:
            lean_activations(model)
        torch.manual_seed(1)  # the same adapter for both
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.3)
        return model

    plain, lean = lora_model(False), lora_model(True)
    ids = torch.randint(0, 100, (2, 9))
    a, b = plain(ids).logits, lean(ids).logits
    torch.testing.assert_close(b, a)
    trained = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    for p, q in zip(torch.autograd.grad(a.square().sum(), trained(plain)), torch.autograd.grad(b.square().sum(), trained(lean))):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-4)
