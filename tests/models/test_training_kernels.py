"""The training-only fast paths compute what the plain forms compute: the one-pass learnable affine block and
its gradients, and the decoder's fused self-attention (with the denoising mask) against the explicit one."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from dfine.models.decoder_layers import DecoderLayer
from dfine.models.denoising import denoising_attention_mask
from dfine.models.hgnetv2 import LearnableAffineBlock

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learnable_affine_forward_and_gradients_equal_the_two_op_form(
    layout: str, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 5, generator=generator).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    upstream = torch.randn(2, 8, 6, 5, generator=generator).to(dtype)
    block = LearnableAffineBlock(scale=1.3, bias=-0.2)
    scale = block.scale.detach().clone().requires_grad_()
    bias = block.bias.detach().clone().requires_grad_()
    ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()

    ours = block(ours_x)
    plain = scale * plain_x + bias
    (ours * upstream).sum().backward()
    (plain * upstream).sum().backward()

    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    assert ours.dtype == plain.dtype
    assert_close(ours, plain, rtol=1e-6, atol=1e-6)  # one rounding (multiply-add) instead of two
    assert_close(ours_x.grad, plain_x.grad, rtol=0, atol=0)
    assert_close(block.scale.grad, scale.grad, **tolerance)
    assert_close(block.bias.grad, bias.grad, **tolerance)


def test_learnable_affine_outside_autograd_is_the_original_two_ops_bit_for_bit() -> None:
    x = torch.randn(3, 4, 5, 6)
    block = LearnableAffineBlock(scale=0.7, bias=0.1)
    with torch.no_grad():
        assert torch.equal(block(x), block.scale * x + block.bias)


def test_decoder_self_attention_in_training_equals_the_explicit_softmax_with_the_denoising_mask() -> None:
    torch.manual_seed(0)
    layer = DecoderLayer(d_model=32, n_head=4, dim_feedforward=64, n_levels=2, n_points=2)
    denoising, queries = 6, 10
    mask = denoising_attention_mask(denoising, 3, queries, torch.device("cpu"))  # 2 groups of 3
    target = torch.randn(2, denoising + queries, 32)
    boxes = torch.rand(2, denoising + queries, 4) * 0.5 + 0.25
    values = [torch.randn(2 * 4, 8, 8, 8), torch.randn(2 * 4, 8, 4, 4)]
    query_pos = torch.randn(2, denoising + queries, 32)

    trained = layer.train()(target, boxes, values, mask, query_pos)  # dropout is 0: only the kernel differs
    explicit = layer.eval()(target, boxes, values, mask, query_pos)

    assert_close(trained, explicit, rtol=1e-5, atol=1e-5)
    # The mask must still block: the matching queries never see the denoising queries (the answers).
    changed = target.clone()
    changed[:, :denoising] += 1.0
    moved = layer.train()(changed, boxes, values, mask, query_pos)
    assert_close(moved[:, denoising:], trained[:, denoising:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moved[:, :denoising], trained[:, :denoising])
