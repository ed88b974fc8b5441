"""bigtrain.losses.cross_entropy: the plain fp32 cross-entropy's value and gradients, without keeping
an fp32 copy (or log-softmax) of every logit when the logits are large."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigtrain.losses import cross_entropy


def new_saved_bytes(fn, logits):
    """Bytes autograd saves for backward in storages other than ``logits``' own."""
    seen, total = {logits.untyped_storage().data_ptr()}, [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_matches_the_plain_loss_and_gradients(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 50, 300, generator=gen).to(dtype)
    labels = torch.randint(0, 300, (4, 50), generator=gen)
    labels[0, :7] = -100
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    plain = F.cross_entropy(a.float().view(-1, 300), labels.view(-1))
    chunked = cross_entropy(b, labels, chunk_elements=300 * 16)  # 13 chunks of 16 rows
    plain.backward()
    chunked.backward()
    assert chunked.item() == pytest.approx(plain.item(), abs=1e-6)
    assert torch.allclose(b.grad.float(), a.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_small_logits_take_the_plain_path_bit_for_bit():
    logits, labels = torch.randn(8, 100), torch.randint(0, 100, (8,))
    assert torch.equal(cross_entropy(logits, labels), F.cross_entropy(logits, labels))


def test_large_logits_keep_no_fp32_copy_for_backward():
    logits = torch.randn(256, 1000, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (256,))
    plain = new_saved_bytes(lambda: F.cross_entropy(logits.float(), labels), logits)
    chunked = new_saved_bytes(lambda: cross_entropy(logits, labels, chunk_elements=1000 * 32), logits)
    assert plain >= 256 * 1000 * 4  # the fp32 log-softmax of every logit
    assert chunked < 256 * 1000 * 4 / 16, (plain, chunked)
