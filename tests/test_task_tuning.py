"""The tuning split keeps validation rows apart from the rows a candidate trains on."""

from __future__ import annotations

import torch

from benchmarks.task_tuning import split_rows


def test_validation_rows_are_disjoint_stratified_and_fixed() -> None:
    x = torch.arange(40, dtype=torch.float32)[:, None]
    y = torch.tensor([0] * 30 + [1] * 8 + [2] * 2)
    fit_x, _, val_x, val_y = split_rows(x, y, seed=7, fraction=0.25)
    assert len(fit_x) + len(val_x) == 40
    assert not set(fit_x[:, 0].tolist()) & set(val_x[:, 0].tolist())
    assert sorted(val_y.tolist()) == [0] * 8 + [1] * 2 + [2]  # every class with 2+ rows is held out
    again = split_rows(x, y, seed=7, fraction=0.25)
    assert torch.equal(again[2], val_x)
    survival = torch.stack([torch.arange(1.0, 21.0), torch.tensor([1.0, 0.0] * 10)], 1)
    _, _, _, held = split_rows(torch.zeros(20, 1), survival, seed=1, fraction=0.2)
    assert held[:, 1].sum() == 2 and len(held) == 4  # stratified by event
