"""Readout covectors through the model's own final norm, against the RMSNorm / LayerNorm formulas."""

import pytest
import torch

from workbench.methods.readout import covector_cosines, readout_covectors, residual_covariance
from workbench.testing.tiny import tiny_model


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_covectors_equal_the_rmsnorm_jacobian(family):
    m = tiny_model(family)
    with torch.no_grad():  # a non-trivial gain, so the test can tell gain from no gain
        norm = m.final_norm
        norm.weight.copy_(torch.linspace(-0.5, 1.5, norm.weight.numel()))
    d = m.d_model
    H = _rand(5, d, seed=1) * 3
    ids = [3, 7]
    got = readout_covectors(m, ids, H, batch_size=2)
    # RMSNorm: n(h) = g * h / r with r = sqrt(mean(h^2) + eps); rms(h) * J^T w = (g*w) - h (h.(g*w)) / (d r^2)
    gain = norm.weight.detach().double() + (1.0 if family == "gemma2" else 0.0)  # gemma's (1 + w)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    ref = torch.zeros(len(ids), d, dtype=torch.float64)
    for h in H.double():
        r2 = h.pow(2).mean() + eps
        scale = h.pow(2).mean().sqrt() / r2.sqrt()
        for i, t in enumerate(ids):
            gw = gain * m.W_U[t].detach().double()
            ref[i] += scale * (gw - h * (h @ gw) / (d * r2))
    ref /= len(H)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # with a gain far from 1 the covector is not the raw row
    assert covector_cosines(m.W_U[3].detach(), got[:1]).item() < 0.99


def test_covariance_and_bad_inputs():
    m = tiny_model("llama")
    S = residual_covariance(_rand(10, m.d_model))  # n < d: shrinkage keeps it positive definite
    assert float(torch.linalg.eigvalsh(S).min()) > 0
    with pytest.raises(ValueError, match="H must be"):
        readout_covectors(m, [1], _rand(3, m.d_model + 1))
    with pytest.raises(ValueError, match="token ids"):
        readout_covectors(m, [10**9], _rand(3, m.d_model))
    with pytest.raises(ValueError, match="w is zero"):
        covector_cosines(torch.zeros(4), torch.ones(2, 4))
