"""The greedy pick kernel == its reference."""

from __future__ import annotations

import pytest
import torch

from edge_dlm.kernels.verify import greedy_pick, greedy_pick_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter (conftest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [7, 100, 5000])
def test_greedy_pick(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(9, vocab, generator=g) * 3).to(DEVICE, dtype)
    mask_id = vocab // 2
    logits[0, mask_id] = 100.0  # the mask id is never picked, however likely
    logits[1, :] = 1.0  # all tied: the first index that is not the mask
    logits[2, vocab - 1] = 50.0  # the maximum in the last chunk
    tok, conf = greedy_pick(logits, mask_id)
    rtok, rconf = greedy_pick_ref(logits, mask_id)
    assert torch.equal(tok.cpu(), rtok.cpu()) and mask_id not in tok.tolist()
    torch.testing.assert_close(conf, rconf, atol=1e-5, rtol=1e-4)
    assert greedy_pick(logits[3:6], mask_id)[0].tolist() == rtok[3:6].tolist()  # a row slice
