"""Pure loss functions of hf_sparse.distill: hand computations on small tensors, no model."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_sparse.distill.losses import (
    causal_target_mask,
    count_target_tokens,
    distillation_loss_sums,
    naive_distillation_loss_sums,
    squarehead_loss_sum,
    token_kd_loss,
)


def _softmax(row, t):
    m = max(x / t for x in row)
    e = [math.exp(x / t - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _hand(student_row, teacher_row, kind, t, beta):
    p_s, p_t = _softmax(student_row, t), _softmax(teacher_row, t)
    if kind == "forward_kl":
        d = _kl(p_t, p_s)
    elif kind == "reverse_kl":
        d = _kl(p_s, p_t)
    else:
        m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
        d = beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)
    return t * t * d


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_matches_hand_computation(kind, beta, temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, generator=g) * 2
    t = torch.randn(3, 5, generator=g) * 2
    got = token_kd_loss(s, t, kind, temperature, beta)
    want = [_hand(s[i].tolist(), t[i].tolist(), kind, temperature, beta) for i in range(3)]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert all(w > 1e-3 for w in want)  # non-trivial case


def test_jsd_endpoints_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    torch.testing.assert_close(token_kd_loss(s, t, "jsd", 1.0, 0.0), token_kd_loss(s, t, "forward_kl", 1.0))
    torch.testing.assert_close(token_kd_loss(s, t, "jsd", 1.0, 1.0), token_kd_loss(s, t, "reverse_kl", 1.0))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_when_student_equals_teacher(kind):
    x = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(2)) * 3
    assert token_kd_loss(x, x.clone(), kind, 2.0).abs().max() < 1e-6
    labels = torch.randint(0, 11, (2, 6))
    sums = distillation_loss_sums(x, x.clone(), labels, kd_loss=kind, temperature=2.0, chunk_size=4)
    assert abs(sums.kd.item()) < 1e-5


def test_bf16_inputs_computed_in_fp32():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    got = token_kd_loss(s.bfloat16(), t.bfloat16(), "forward_kl", 2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, token_kd_loss(s.bfloat16().float(), t.bfloat16().float(), "forward_kl", 2.0))


def test_vocab_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"student 10, teacher 12"):
        token_kd_loss(torch.randn(2, 10), torch.randn(2, 12))


def test_unknown_kd_loss():
    with pytest.raises(ValueError, match="unknown kd_loss"):
        token_kd_loss(torch.randn(2, 4), torch.randn(2, 4), "kl")


def test_causal_mask_and_count():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, 3]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert causal_target_mask(labels).tolist() == [[True, False, True], [True, True, True]]
    assert causal_target_mask(labels, attn).tolist() == [[True, False, True], [True, True, False]]
    assert int(count_target_tokens(labels, attn)) == 4


def test_ignored_tokens_do_not_count():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    labels = torch.randint(0, 8, (2, 5), generator=g)
    labels[0, 2] = -100  # position 1 of row 0 is not a target
    labels[1, 4] = -100  # position 3 of row 1 is not a target
    base = distillation_loss_sums(s, t, labels, temperature=2.0)
    s2, t2 = s.clone(), t.clone()
    s2[0, 1] += 5 * torch.randn(8, generator=g)
    t2[1, 3] -= 5 * torch.randn(8, generator=g)
    s2[:, -1] = 100.0  # the last position predicts nothing
    moved = distillation_loss_sums(s2, t2, labels, temperature=2.0)
    assert base.num_tokens == moved.num_tokens == 6
    torch.testing.assert_close(base.kd, moved.kd)
    torch.testing.assert_close(base.ce, moved.ce)
    # and a target position does count
    s2[0, 0] += torch.randn(8, generator=g)
    assert not torch.allclose(base.kd, distillation_loss_sums(s2, t2, labels, temperature=2.0).kd)


def test_ce_matches_cross_entropy_with_shift():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[1, :3] = -100
    sums = distillation_loss_sums(s, t, labels, chunk_size=2)
    want = F.cross_entropy(s[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(sums.ce, want)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_naive_values_and_gradients(kind):
    g = torch.Generator().manual_seed(6)
    hidden, vocab = 8, 13
    s_head = torch.nn.Linear(hidden, vocab, bias=True)
    t_head = torch.nn.Linear(hidden, vocab, bias=False).to(torch.bfloat16)
    t_head.requires_grad_(False)
    h_s = torch.randn(3, 7, hidden, generator=g, requires_grad=True)
    h_t = torch.randn(3, 7, hidden, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (3, 7), generator=g)
    labels[0, :4] = -100
    attn = torch.ones(3, 7, dtype=torch.long)
    attn[2, 5:] = 0
    kw = dict(student_head=s_head, teacher_head=t_head, attention_mask=attn, kd_loss=kind, temperature=1.5, jsd_beta=0.3)

    naive = naive_distillation_loss_sums(h_s, h_t, labels, **kw)
    (naive.kd + 0.3 * naive.ce).backward()
    grads_naive = [h_s.grad.clone(), s_head.weight.grad.clone(), s_head.bias.grad.clone()]
    h_s.grad = None
    s_head.zero_grad(set_to_none=True)

    chunked = distillation_loss_sums(h_s, h_t, labels, chunk_size=4, **kw)  # 12 targets, chunks of 4
    (chunked.kd + 0.3 * chunked.ce).backward()
    grads_chunked = [h_s.grad, s_head.weight.grad, s_head.bias.grad]

    assert chunked.num_tokens == naive.num_tokens == 3 * 6 - 3 - 2
    torch.testing.assert_close(chunked.kd, naive.kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.ce, naive.ce, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_chunked, grads_naive):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert t_head.weight.grad is None


def test_no_targets_gives_connected_zero():
    h = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.full((1, 4), -100)
    sums = distillation_loss_sums(h, torch.randn(1, 4, 5), labels)
    assert sums.num_tokens == 0 and sums.kd.item() == 0.0
    sums.kd.backward()
    assert h.grad is not None and h.grad.abs().max() == 0


def test_squarehead_hand_computation_and_masking():
    g = torch.Generator().manual_seed(7)
    s = [torch.randn(2, 4, 3, generator=g) for _ in range(2)]
    t = [torch.randn(2, 4, 3, generator=g) for _ in range(2)]
    labels = torch.tensor([[1, 2, -100, 3], [4, -100, -100, -100]])
    got = squarehead_loss_sum(s, t, labels, eps=1e-6)
    positions = [(0, 0), (0, 2)]  # i such that labels[i + 1] != -100 (row 1 has none)
    want = 0.0
    for hs, ht in zip(s, t):
        for b, i in positions:
            d = sum((x - y) ** 2 for x, y in zip(hs[b, i].tolist(), ht[b, i].tolist())) / 3
            n = sum(y * y for y in ht[b, i].tolist()) / 3
            want += d / (n + 1e-6)
    assert got.item() == pytest.approx(want / 2, rel=1e-5)
    assert squarehead_loss_sum(t, [x.clone() for x in t], labels).item() == 0.0
    with pytest.raises(ValueError, match="same number of layers"):
        squarehead_loss_sum(s, t[:1], labels)
