"""bench/conditioning.py's diagnostics against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from bench.conditioning import conditioning


def test_orthonormal_keys_are_perfectly_conditioned() -> None:
    keys = torch.eye(6)[:, :3] * 2.0  # three orthogonal keys of norm 2, C = I
    out = conditioning(keys, torch.eye(6), [1, 2, 3])
    assert out["n"] == 3 and out["cond_D"] == pytest.approx(1.0)
    assert out["mean_diag_D"] == pytest.approx(4.0)
    assert out["min_eig_Dn"] == pytest.approx(1.0) and out["max_eig_Dn"] == pytest.approx(1.0)
    assert out["max_cos"] == pytest.approx(0.0, abs=1e-12)
    assert out["pairs_cos>0.9"] == 0 and out["pairs_same_last_token"] == 0


def test_near_parallel_keys_in_the_c_metric() -> None:
    # Keys 0 and 1 differ only along a direction C weighs heavily (variance 1e4), so in the C⁻¹ metric they
    # are nearly parallel: cos = 1 / sqrt(1 + 1e-4) by hand; key 2 is orthogonal to both.
    cov = torch.diag(torch.tensor([1.0, 1e4, 1.0]))
    keys = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = conditioning(keys, cov, [7, 7, 8])
    cos = 1 / (1 + 1e-4) ** 0.5
    assert out["max_cos"] == pytest.approx(cos)
    assert out["min_eig_Dn"] == pytest.approx(1 - cos) and out["max_eig_Dn"] == pytest.approx(1 + cos)
    assert out["pairs_cos>0.99"] == 1 and out["pairs_cos>0.99_same_last_token"] == 1
    assert out["pairs_same_last_token"] == 1
    d = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0 + 1e-4, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert out["cond_D"] == pytest.approx(float(torch.linalg.cond(d)), rel=1e-6)
