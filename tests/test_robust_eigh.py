"""A failing eigh is recovered from and reported (issue 14.5)."""

import pytest
import torch

from hsc_plugin import decomposition as D


@pytest.mark.parametrize("fail", [1, 3])  # first call fails (jitter), or all eigh calls fail (SVD)
def test_forced_eigh_failure_recovers_and_warns(monkeypatch, fail):
    A = torch.randn(6, 3, dtype=torch.float64)
    S = A @ A.T  # rank 3: repeated zero eigenvalues
    ref_vals, _ = D.sym_eig_desc(S)
    real, calls = torch.linalg.eigh, []

    def flaky(M):
        calls.append(1)
        if len(calls) <= fail:
            raise torch.linalg.LinAlgError("forced")
        return real(M)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with pytest.warns(D.DecompositionWarning):
        vals, vecs = D.sym_eig_desc(S)
    torch.testing.assert_close(vals, ref_vals, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vecs[:, :3] @ torch.diag(vals[:3]) @ vecs[:, :3].T, S, atol=1e-6, rtol=1e-6)
