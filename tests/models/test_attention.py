"""vit.models.layers.attention: the plain softmax(q k^T) v when training in bf16 on a CPU (where the fused kernel's
backward is slow), PyTorch's fused kernel everywhere else, the same function either way."""
import pytest
import torch
import torch.nn.functional as F

import vit
from vit.models import layers
from vit.models.layers import attention, use_explicit_attention


def _qkv(dtype, n=17, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 8, generator=g, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def test_the_explicit_form_runs_only_for_bf16_training_on_a_cpu_up_to_the_token_limit(monkeypatch):
    assert use_explicit_attention(_qkv(torch.bfloat16)[0])
    assert not use_explicit_attention(_qkv(torch.float32)[0])  # fp32: the fused kernel is faster
    assert not use_explicit_attention(_qkv(torch.bfloat16, requires_grad=False)[0])  # inference
    with torch.no_grad():
        assert not use_explicit_attention(_qkv(torch.bfloat16)[0])
    monkeypatch.setattr(layers, "EXPLICIT_ATTENTION_MAX_TOKENS", 16)
    assert not use_explicit_attention(_qkv(torch.bfloat16, n=17)[0])  # long sequences: memory of the (N, N) weights


@pytest.mark.parametrize("masked", [False, True])
def test_explicit_attention_matches_the_fused_kernel_forward_and_backward(masked):
    mask = torch.rand(17, 17, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    if masked:
        mask.fill_diagonal_(True)  # every query keeps a key
        mask[1:, 0] = mask[0, 0] = False  # no query may attend key 0 (query 0 keeps others)
        assert mask[0].any()
    q, k, v = _qkv(torch.bfloat16)
    assert use_explicit_attention(q)
    out = attention(q, k, v, attn_mask=mask)
    out.float().square().sum().backward()
    # the reference: fp32 through the fused kernel, on the same bf16 values
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask)
    ref.square().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for ours, theirs in ((q, q32), (k, k32), (v, v32)):
        torch.testing.assert_close(ours.grad.float(), theirs.grad, atol=6e-2, rtol=6e-2)
    if masked:  # a key no query may attend gets no gradient: the mask is applied, not ignored
        assert k.grad[:, :, 0].abs().max() == 0 and v.grad[:, :, 0].abs().max() == 0


def test_fused_cases_are_the_fused_kernel_exactly():
    q, k, v = _qkv(torch.float32)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=0, rtol=0)


def test_a_model_trains_in_bf16_on_a_cpu_through_the_explicit_form_with_the_fused_kernels_loss_and_gradients(
        monkeypatch):
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                                  attn_layer="lsa")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    loss, grads = loss_and_grads()
    assert not calls  # every block took the explicit form
    monkeypatch.setattr(layers, "EXPLICIT_ATTENTION_MAX_TOKENS", 0)  # now every block takes the fused kernel
    fused_loss, fused_grads = loss_and_grads()
    assert len(calls) == 2
    torch.testing.assert_close(loss, fused_loss, atol=2e-2, rtol=2e-2)
    for ours, theirs in zip(grads, fused_grads):
        torch.testing.assert_close(ours, theirs, atol=3e-2, rtol=0.1)
