import pytest
import torch

from hf_sparse.patterns import NM, Unstructured, lowest_k_mask, nm_mask, parse_pattern, unstructured_mask


@pytest.mark.parametrize(
    "spec, expected",
    [(0.5, Unstructured(0.5)), ("0.7", Unstructured(0.7)), ("50%", Unstructured(0.5)), ("2:4", NM(2, 4)), (" 4 : 8 ", NM(4, 8))],
)
def test_parse_pattern(spec, expected):
    assert parse_pattern(spec) == expected


@pytest.mark.parametrize("spec", [1.0, -0.1, "1.5", "150%", "abc", True])
def test_bad_sparsity_is_a_clear_error(spec):
    with pytest.raises(ValueError, match="sparsity|fraction"):
        parse_pattern(spec)


@pytest.mark.parametrize("spec", ["4:4", "5:4", "8:4"])
def test_nm_with_n_not_below_m_is_rejected(spec):
    with pytest.raises(ValueError, match="N must be smaller than M"):
        parse_pattern(spec)


def test_nm_needs_divisible_input_dimension():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        NM(2, 4).validate_for(6, "x")
    NM(2, 4).validate_for(8, "x")


def test_nm_sparsity():
    assert NM(2, 4).sparsity == 0.5
    assert NM(1, 4).sparsity == 0.75


def test_masks_are_exact_and_pick_lowest():
    torch.manual_seed(0)
    scores = torch.randn(6, 16)
    mask = lowest_k_mask(scores, 5)
    assert (mask.sum(1) == 5).all()
    assert (scores[mask].view(6, 5).max(1).values <= scores[~mask].view(6, 11).min(1).values).all()
    nm = nm_mask(scores, 2, 4)
    assert (nm.view(6, 4, 4).sum(-1) == 2).all()
    layer = unstructured_mask(scores, 0.25, per_row=False)
    assert layer.sum() == 24 and not (layer.sum(1) == 4).all()  # global, not per row


def test_zero_kept_per_group_is_rejected():
    with pytest.raises(ValueError, match="1 <= N < M"):
        parse_pattern("0:4")
