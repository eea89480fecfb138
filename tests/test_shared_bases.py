"""Rank-free work done once and shared: Tucker-2 bases from small Gram matrices, eigen-decompositions
cached on moments and layers, thin-factor moments completed without a C×C eigh.

These are what keep a 4096×512×7×7 conv (VGG's classifier) in seconds and one float64 weight copy;
here they are checked against the direct constructions they replace.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsc_plugin import decomposition as D
from hsc_plugin.calibration import LayerInfo
from hsc_plugin.compressors.global_svd import SVDPlan
from hsc_plugin.compressors.tucker2 import Tucker2Plan


def _projector(U: torch.Tensor) -> torch.Tensor:
    return U @ U.T


def _psd(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return F @ F.T


@pytest.mark.parametrize("shape,k", [((40, 6), 4), ((40, 6), 6), ((6, 40), 4), ((30, 30), 7)])
def test_top_left_vectors_span_the_svd_ones(shape: tuple[int, int], k: int) -> None:
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U = D._top_left_vectors(A, k)
    ref = torch.linalg.svd(A, full_matrices=False)[0][:, :k]
    assert U.shape == (shape[0], k)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(_projector(U), _projector(ref), atol=1e-8, rtol=0)


def test_top_left_vectors_of_a_rank_deficient_tall_matrix_stay_orthonormal() -> None:
    g = torch.Generator().manual_seed(1)
    A = torch.randn(30, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 8, generator=g, dtype=torch.float64)
    U = D._top_left_vectors(A, 5)  # 3 of the 5 directions are null: the m×m Gram path
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.linalg.norm(A - _projector(U) @ A) < 1e-8 * torch.linalg.norm(A)


def test_mode_gram_is_the_unfolding_gram() -> None:
    W = torch.randn(7, 5, 3, 3, generator=torch.Generator().manual_seed(2))
    for mode in (0, 1):
        A = D._unfold(W.double(), mode)
        torch.testing.assert_close(D.mode_gram(W, mode), A @ A.T)


def test_complete_eig_of_a_thin_factor() -> None:
    F = torch.randn(12, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m = D.Moment(factor=F)
    evals, U = m.complete_eig()
    assert U.shape == (12, 12) and evals.shape == (12,)
    torch.testing.assert_close(U.T @ U, torch.eye(12, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close((U * evals) @ U.T, F @ F.T, atol=1e-10, rtol=0)
    assert torch.equal(U[:, :4], m.eig()[1])  # the thin factor's own eigenvectors come first
    assert m.eig() is m.eig()  # cached


@pytest.mark.parametrize("data", ["aware", "out only", "in only"])
def test_data_aware_tucker2_equals_the_whitened_svd_construction(data: str) -> None:
    """The bases come from Ci×Ci / Co×Co eigen-decompositions; the reference takes the SVD of the
    whitened unfolding as the method is written (DESIGN.md §5). Same factors up to sign."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(9, 6, 3, 3, generator=g, dtype=torch.float64)
    S_out = _psd(9, 20, 5) if data != "in only" else None
    S_in = _psd(6, 20, 6) if data != "out only" else None
    U, core, V = D.tucker2(W, 4, 3, S_out=S_out, S_in=S_in)
    if S_in is not None:
        root, inv_root = D.sqrtm_psd(S_in * (6 / S_in.trace()))
        E = torch.linalg.svd(root @ D._unfold(W, 1), full_matrices=False)[0][:, :3]
        proj, lift = inv_root @ E, root @ E
    else:
        proj = lift = torch.linalg.svd(D._unfold(W, 1), full_matrices=False)[0][:, :3]
    Ur = (D.rrr_basis(S_out)[1] if S_out is not None else torch.linalg.svd(D._unfold(W, 0))[0])[:, :4]
    core_r = torch.einsum("oikl,or,is->rskl", W, Ur, lift)
    # The layer the factors make, W ≈ U ×₀ core ×₁ V (sign-invariant), and the kept subspaces.
    approx = torch.einsum("or,rskl,is->oikl", U, core, V)
    approx_r = torch.einsum("or,rskl,is->oikl", Ur, core_r, proj)
    torch.testing.assert_close(approx, approx_r, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(_projector(U), _projector(Ur), atol=1e-9, rtol=0)


def test_hooi_from_a_given_start_is_the_same_hooi() -> None:
    W = torch.randn(10, 7, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a = D._hooi2(W, 4, 3, 3)
    b = D.Tucker2Bases(W).factors(4, 3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert D.Tucker2Bases(W).factors(4, 3)[1].shape == (4, 3, 3, 3)


def test_plans_of_one_layer_share_the_weight_and_its_gram() -> None:
    conv = nn.Conv2d(6, 8, 3)
    info = LayerInfo("c", conv, (6, 10, 10), (8, 8, 8))
    svd = SVDPlan(info, None)
    tk = Tucker2Plan(info, None, None)
    assert tk.weights[0].data_ptr() == info.weight64().data_ptr()
    assert svd.factors[0][0].data_ptr() == tk.bases[0].U_out.data_ptr()  # one mode-0 Gram eigh for both
    # The data-free Tucker-2 block still offers its matrix to VBMF, made on request.
    M = tk.blocks[1].the_matrix()
    torch.testing.assert_close(M, D._unfold(conv.weight.detach().double(), 1))
