"""`binary_auc`: the ROC AUC of a label margin, as the pairwise definition gives it."""

from __future__ import annotations

import pytest
import torch

from fedpeft.common.training.evaluation import binary_auc


def _pairwise_auc(margin: torch.Tensor, gold: torch.Tensor) -> float:
    """P(margin of a positive > margin of a negative), ties counting one half: the definition."""
    pos, neg = margin[gold == 1], margin[gold == 0]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


@pytest.mark.parametrize("seed", range(5))
def test_it_matches_the_pairwise_definition_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    margin = torch.randint(-4, 5, (60,), generator=generator).float() / 2  # many ties
    gold = torch.randint(0, 2, (60,), generator=generator)
    assert binary_auc(margin, gold) == pytest.approx(_pairwise_auc(margin, gold), abs=1e-12)


def test_ranking_not_threshold_is_what_it_measures():
    gold = torch.tensor([0, 0, 1, 1])
    assert binary_auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), gold) == 1.0  # every row on one side, ranked perfectly
    assert binary_auc(torch.tensor([4.0, 3.0, 2.0, 1.0]), gold) == 0.0
    assert binary_auc(torch.zeros(4), gold) == 0.5  # a constant margin ranks nothing
    assert binary_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])) is None  # one label: undefined
    assert binary_auc(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 1])) is None
    inf = float("inf")
    assert binary_auc(torch.tensor([-inf, inf, 0.0]), torch.tensor([0, 1, 1])) == 1.0  # infinite margins still rank
    assert binary_auc(torch.tensor([inf, inf]), torch.tensor([0, 1])) == 0.5
