"""Greedy pick, LinearSpec / QuadraticSpec acceptance and diffusion selection kernels == their references."""

from __future__ import annotations

import random

import pytest
import torch

from edge_dlm.kernels.verify import (diffusion_select, diffusion_select_ref, greedy_pick, greedy_pick_ref,
                                     linear_accept, linear_accept_ref, quad_accept, quad_accept_ref)

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


@pytest.mark.parametrize("b", [1, 2, 4, 8, 32])
def test_linear_accept(b):
    rnd = random.Random(b)
    for _ in range(20):
        ar = [rnd.randrange(4) for _ in range(b)]
        drafted = [a if rnd.random() < 0.7 else rnd.randrange(4) for a in ar[:b - 1]]
        out = linear_accept(torch.tensor(ar, device=DEVICE), torch.tensor(drafted, device=DEVICE, dtype=torch.int64))
        assert tuple(out.tolist()) == linear_accept_ref(ar, drafted)


@pytest.mark.parametrize("b", [1, 2, 3, 8, 16])
def test_quad_accept(b):
    rnd = random.Random(b)
    for _ in range(20):
        picks = [[rnd.randrange(3) for _ in range(b + 1)] for _ in range(b)]
        d = [rnd.randrange(3)] + [picks[g - 1][0] if rnd.random() < 0.7 else rnd.randrange(3) for g in range(1, b)]
        acc, nxt = quad_accept(torch.tensor(picks, device=DEVICE), torch.tensor(d, device=DEVICE))
        racc, rnxt = quad_accept_ref(picks, d)
        assert (acc.item(), nxt.tolist()) == (racc, rnxt)


@pytest.mark.parametrize("b", [4, 16, 32])
@pytest.mark.parametrize("steps_left", [1, 2, 5])
def test_diffusion_select(b, steps_left):
    rnd = random.Random(b * 10 + steps_left)
    mask = 3
    for threshold in (0.9, 0.5, 1.0):
        canvas = [7] + [mask if rnd.random() < 0.8 else rnd.randrange(10, 20) for _ in range(b - 1)]
        picks = [rnd.randrange(20, 30) for _ in range(b)]
        conf = [rnd.choice([0.25, 0.5, 0.75, rnd.random()]) for _ in range(b)]  # with ties
        out, chosen = diffusion_select(torch.tensor(canvas, device=DEVICE), torch.tensor(picks, device=DEVICE),
                                       torch.tensor(conf, device=DEVICE), mask, steps_left, threshold)
        rcanvas, rchosen = diffusion_select_ref(canvas, picks, conf, mask, steps_left, threshold)
        assert out.tolist() == rcanvas and chosen.tolist() == rchosen
