"""Decomposition maths on plain tensors: no modules, no hooks, no framework glue.

Every function here takes matrices or weight tensors and returns factors, so that each
compressor (and each test) can check the algebra on its own, as TensorLy separates its
decompositions from the layers that use them. Computations run in float64 for stability and
the caller casts the factors back to the layer's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import warnings

import torch

__all__ = [
    "truncated_svd",
    "rrr_basis",
    "sym_eig_desc",
    "factor_eig_desc",
    "sqrtm_psd",
    "tucker2",
    "Tucker2Bases",
    "fold_input_factor",
    "mode_gram",
    "evbmf_rank",
    "Moment",
    "robust_svd",
    "sq_singular_values",
    "DecompositionWarning",
]


class DecompositionWarning(UserWarning):
    """An eigen-decomposition needed a jitter or the SVD fallback (an ill-conditioned moment)."""


def _robust_eigh(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh``, retried with a scaled diagonal jitter, then via SVD (LAPACK's syevd can fail to
    converge on low-rank moments with many repeated zero eigenvalues)."""
    try:
        return torch.linalg.eigh(S)
    except torch.linalg.LinAlgError:
        pass
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    scale = float(S.diagonal().abs().mean()) or 1.0
    for eps in (1e-10, 1e-7):
        try:
            evals, evecs = torch.linalg.eigh(S + eps * scale * eye)
            warnings.warn(f"eigh failed; recovered with a diagonal jitter {eps:g}", DecompositionWarning, stacklevel=3)
            return evals - eps * scale, evecs
        except torch.linalg.LinAlgError:
            continue
    U, s, _ = torch.linalg.svd(S)  # PSD: singular vectors are eigenvectors, ascending like eigh
    warnings.warn("eigh failed; recovered with the SVD fallback", DecompositionWarning, stacklevel=3)
    return s.flip(0), U.flip(1)


def robust_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``M = U diag(s) Vh`` in float64; where LAPACK fails to converge, computed from the
    (robust) eigen-decomposition of the smaller Gram matrix instead, with a DecompositionWarning."""
    M = M.double()
    try:
        return torch.linalg.svd(M, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    warnings.warn("svd failed; recovered through the Gram matrix's eigen-decomposition", DecompositionWarning,
                  stacklevel=3)
    wide = M.shape[0] <= M.shape[1]
    evals, V = sym_eig_desc(M @ M.T if wide else M.T @ M)
    s = evals.sqrt()
    inv = torch.where(s > s.max().clamp_min(1e-300) * 1e-12, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    if wide:  # V are left vectors: Vh = diag(1/s) Uᵀ M
        return V, s, (V * inv).T @ M
    return M @ (V * inv), s, V.T


def sq_singular_values(A: torch.Tensor) -> torch.Tensor:
    """``svdvals(A) ** 2`` (descending) from the eigenvalues of the smaller Gram matrix: ~15× faster
    than an SVD of the wide unfoldings of ResNet-sized layers, same values to ~1e-15 (float64)."""
    A = A.double()
    G = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    return sym_eig_desc(G)[0]


def sym_eig_desc(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, eigenvalues descending and clamped at 0."""
    S = 0.5 * (S + S.T)
    evals, evecs = _robust_eigh(S.double())
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    return evals, evecs


class Moment:
    """A PSD second moment, given as the matrix ``S`` or as a thin factor ``F`` with ``S = F Fᵀ``."""

    def __init__(self, matrix: torch.Tensor | None = None, factor: torch.Tensor | None = None) -> None:
        self.matrix, self.factor = matrix, factor
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None

    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues descending and their eigenvectors (only the possibly non-zero ones for a factor).

        Computed once: every form of a layer that factorises this moment (SVD and Tucker-2 blocks,
        whole-map plans) shares it — on a 4096-channel layer each eigh is seconds."""
        if self._eig is None:
            self._eig = sym_eig_desc(self.matrix) if self.factor is None else factor_eig_desc(self.factor)
        return self._eig

    def complete_eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All C eigenpairs. A thin factor's D eigenvectors are completed by an orthonormal basis of
        their complement (eigenvalue 0) from one complete QR — O(C²D), not a C×C eigh."""
        evals, U = self.eig()
        C, D = U.shape
        if self.factor is None or D >= C:
            return evals, U
        rest = torch.linalg.qr(U, mode="complete")[0][:, D:]
        return torch.cat([evals, evals.new_zeros(C - D)]), torch.cat([U, rest], 1)

    def full(self) -> torch.Tensor:
        """The moment as a matrix."""
        return self.matrix if self.factor is None else self.factor @ self.factor.T


def truncated_svd(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``M`` (U: m×r, s: r, Vh: r×n), in float64."""
    U, s, Vh = robust_svd(M)
    return U[:, :rank], s[:rank], Vh[:rank]


def rrr_basis(S_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal output directions of a layer from its output second moment ``S_out = Σ y yᵀ``.

    Projecting the weight onto the top-k eigenvectors P_k (``W_k = P_k P_kᵀ W``) is the
    reduced-rank-regression optimum: it minimises ``Σ ||y - ŷ||²`` over the calibration data for
    rank k, and the discarded eigenvalues are exactly that error. Equivalent to the SVD of
    ``W Σ_x^{1/2}`` (input whitening) without forming or inverting the input covariance.
    Returns (eigenvalues descending, eigenvectors as columns).
    """
    return sym_eig_desc(S_out)


def factor_eig_desc(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of ``S = F Fᵀ`` from a thin factor (C × D, D < C): O(C·D²) instead of
    O(C³). Eigenvalues descending; only the D possibly non-zero ones are returned."""
    U, s, _ = robust_svd(F)
    return s * s, U


def sqrtm_psd(S: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Square root and regularised inverse square root of a PSD matrix (float64)."""
    evals, evecs = sym_eig_desc(S)
    floor = eps * float(evals.max().clamp_min(1e-30))
    ev = evals.clamp_min(floor)
    root = (evecs * ev.sqrt()) @ evecs.T
    inv_root = (evecs * ev.rsqrt()) @ evecs.T
    return root, inv_root


def _unfold(W: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(W, mode, 0).reshape(W.shape[mode], -1)


def mode_gram(W: torch.Tensor, mode: int) -> torch.Tensor:
    """``W_(mode) W_(mode)ᵀ`` of a conv weight (Co×Ci×kh×kw) in float64, without copying the
    unfolding: the mode-1 unfolding of a 4096×512×7×7 layer is an 800 MB copy in float64."""
    Wd = W.double()
    if mode == 0:
        A = Wd.reshape(Wd.shape[0], -1)
        return A @ A.T
    return torch.einsum("oikl,ojkl->ij", Wd, Wd)


def _top_left_vectors(A: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` left singular vectors of ``A`` from the smaller Gram matrix's eigenvectors.

    For a tall ``A`` (m > n, as HOOI's projected unfoldings of layers with many outputs are) the
    n×n Gram ``AᵀA`` gives ``U = A V diag(1/s)``; it is used when its ``k`` singular values are
    clearly non-zero, otherwise the m×m Gram (whose extra eigenvectors span the null space)."""
    m, n = A.shape
    if m > n and k <= n:
        evals, V = sym_eig_desc(A.T @ A)
        s = evals[:k].sqrt()
        if k == 0 or float(s[-1]) > 1e-10 * float(s[0]):
            U = (A @ V[:, :k]) / s
            # One re-orthonormalisation step removes the rounding the division amplifies.
            Q, R = torch.linalg.qr(U)
            return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)
    return sym_eig_desc(A @ A.T)[1][:, :k]


class Tucker2Bases:
    """Everything about one weight's Tucker-2 that does not depend on the ranks, computed once.

    Data-aware (either moment given): the output factor's candidates are the output second
    moment's eigenvectors (reduced-rank regression), the input factor's the left singular vectors
    of ``Σ_in^{1/2} W_(1)`` (input whitening), taken from the eigen-decomposition of the small
    Ci×Ci matrix ``Σ^{1/2} W_(1) W_(1)ᵀ Σ^{1/2}`` — the unfolding itself (Ci × Co·k²) is never
    formed or decomposed. Any pair of ranks is then a slice and one contraction
    (:meth:`factors`). Data-free: the modes' spectra, and the HOOI start (the mode-1 factor);
    HOOI itself depends on the ranks and runs in :meth:`factors`.

    ``S_out`` may be a :class:`Moment`, whose (cached) eigen-decomposition is then shared with the
    other forms that use it; ``gram_eig``, the eigen-decomposition of ``W_(0) W_(0)ᵀ`` when the caller
    already has it (without ``S_out``). ``energies_out`` / ``energies_in``: squared singular values of the (whitened) unfoldings,
    descending — what the rank selectors water-fill.
    """

    def __init__(self, W: torch.Tensor, S_out: "torch.Tensor | Moment | None" = None,
                 S_in: torch.Tensor | None = None, *, n_iter: int = 3,
                 gram_eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.W = W.double()
        self.data_free = S_out is None and S_in is None
        self.n_iter = n_iter
        self._hooi: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        G1 = mode_gram(self.W, 1)
        if S_in is not None:
            # Scale the moment to unit mean eigenvalue: the kept directions do not change, but the
            # first 1×1 (∝ Σ^-½) and the core (∝ Σ^½) get comparable magnitudes. Raw sums over
            # 10⁵ pixels made them differ by 10⁵×, and fine-tuning with Adam then wrecked the model.
            scale = S_in.shape[0] / float(S_in.double().trace().clamp_min(1e-30))
            root, inv_root = sqrtm_psd(S_in.double() * scale)
            ei, E = sym_eig_desc(root @ G1 @ root)
            self.energies_in = ei / scale  # the spectrum of the unscaled whitened unfolding
            self.proj_in, self.lift_in = inv_root @ E, root @ E  # z = proj_inᵀ x, x̂ = lift_in z
        else:
            self.energies_in, E = sym_eig_desc(G1)
            self.proj_in = self.lift_in = E
        if isinstance(S_out, Moment):
            self.energies_out, self.U_out = S_out.eig()[0], S_out.complete_eig()[1]
        elif S_out is not None:
            self.energies_out, self.U_out = rrr_basis(S_out)
        else:
            self.energies_out, self.U_out = gram_eig if gram_eig is not None else sym_eig_desc(mode_gram(self.W, 0))

    def factors(self, rank_out: int, rank_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_out: Co×R_out, core: R_out×R_in×kh×kw, V_in: Ci×R_in)`` at these ranks."""
        if self.data_free and self.n_iter > 0:
            # HOOI depends on the ranks; the last pair is kept for a repeated request (the core of
            # VGG's 4096×512×7×7 conv is ~300 MB at its ranks, so no more than one).
            key = (int(rank_out), int(rank_in))
            if key not in self._hooi:
                self._hooi.clear()
                self._hooi[key] = _hooi2(self.W, rank_out, rank_in, self.n_iter, V=self.proj_in[:, :rank_in])
            return self._hooi[key]
        U_out, lift_in = self.U_out[:, :rank_out], self.lift_in[:, :rank_in]
        core = torch.einsum("oikl,or,is->rskl", self.W, U_out, lift_in)
        return U_out, core, self.proj_in[:, :rank_in]


def fold_input_factor(core: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The k×k weight (R_out × C_in × kh × kw) of a 1×1 with weight ``first`` (R_in × C_in) followed by
    the k×k ``core`` (R_out × R_in × kh × kw): Tucker-2 at full input rank, where the first 1×1 is
    invertible and a separate kernel costs time for nothing."""
    return torch.einsum("rskl,si->rikl", core, first)


def tucker2(
    W: torch.Tensor,
    rank_out: int,
    rank_in: int,
    *,
    S_out: torch.Tensor | None = None,
    S_in: torch.Tensor | None = None,
    n_iter: int = 3,
    backend: str = "gram",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv weight ``W`` (Co×Ci×kh×kw) over its two channel modes.

    Returns ``(U_out: Co×R_out, core: R_out×R_in×kh×kw, V_in: Ci×R_in)`` so that the layer becomes
    1×1 conv with weight ``V_inᵀ`` → k×k conv with ``core`` → 1×1 conv with ``U_out``.

    Data-free (the literature's default): HOSVD initialisation refined by ``n_iter`` HOOI sweeps
    over modes 0 and 1. ``backend="gram"`` takes each mode's factor from the eigenvectors of the
    small Gram matrix of its unfolding (fast, float64); ``backend="tensorly"`` runs TensorLy's
    ``partial_tucker`` on the torch backend (same algorithm, full SVDs of the wide unfoldings:
    about 10× slower on ResNet-sized layers). Data-aware when second moments are
    given: the output factor comes from the output second moment (reduced-rank regression) and
    the input factor from the SVD of ``Σ_in^{1/2} W_(1)`` (input whitening), so the kept factors
    minimise the output error on the calibration data instead of the weight error. To factorise
    one weight at several ranks, build :class:`Tucker2Bases` once and call its ``factors``.
    """
    if S_out is None and S_in is None and backend == "tensorly":
        import tensorly as tl
        from tensorly.decomposition import partial_tucker

        with tl.backend_context("pytorch"):
            (core, factors), _ = partial_tucker(
                W.double(), rank=[rank_out, rank_in], modes=[0, 1], init="svd", n_iter_max=n_iter, tol=1e-8
            )
        return factors[0], core, factors[1]
    return Tucker2Bases(W, S_out, S_in, n_iter=n_iter).factors(rank_out, rank_in)


def _hooi2(W: torch.Tensor, rank_out: int, rank_in: int, n_iter: int,
           V: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial Tucker over modes 0 and 1 by HOOI, every factor from a Gram eigen-decomposition.

    Starts from the mode-1 HOSVD factor ``V`` (given, or computed); the mode-0 HOSVD factor is
    computed only without sweeps (each sweep recomputes it from ``V`` first)."""
    if V is None:
        V = sym_eig_desc(mode_gram(W, 1))[1][:, :rank_in]
    if n_iter < 1:
        U = sym_eig_desc(mode_gram(W, 0))[1][:, :rank_out]
    for _ in range(n_iter):
        U = _top_left_vectors(_unfold(torch.einsum("oikl,is->oskl", W, V), 0), rank_out)
        V = _top_left_vectors(_unfold(torch.einsum("oikl,or->rikl", W, U), 1), rank_in)
    core = torch.einsum("oikl,or,is->rskl", W, U, V)
    return U, core, V


def evbmf_rank(Y: torch.Tensor, sigma2: float | None = None) -> int:
    """Rank of ``Y`` estimated by empirical variational Bayesian matrix factorisation.

    Nakajima et al., "Global analytic solution of fully-observed variational Bayesian matrix
    factorization", JMLR 2013: the noise variance is estimated by minimising the EVB free energy
    and singular values below the EVB threshold are discarded. The usual data-free rank choice
    for Tucker compression of convs (Kim et al. 2016).
    """
    from scipy.optimize import minimize_scalar

    Y = Y.double()
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    s = sq_singular_values(Y).sqrt().cpu().numpy()
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    if sigma2 is None:
        xubar = (1 + tauubar) * (1 + alpha / tauubar)
        eH_ub = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1
        upper = float(np.sum(s**2)) / (L * M)
        tail = s[eH_ub + 1:] if 0 <= eH_ub + 1 < len(s) else s[-1:]
        lower = max(float(tail[0]) ** 2 / (M * xubar), float(np.mean(tail**2)) / M)
        if not upper > lower > 0:
            sigma2 = upper
        else:
            res = minimize_scalar(
                _evb_free_energy, args=(L, M, s, xubar), bounds=(lower, upper), method="bounded"
            )
            sigma2 = float(res.x)
    if sigma2 <= 0:
        return int(np.sum(s > 0))
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold))


def _evb_free_energy(sigma2: float, L: int, M: int, s: np.ndarray, xubar: float) -> float:
    """EVB free energy as a function of the noise variance (fully observed, H = L)."""
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = 0.5 * (z1 - (1 + alpha) + np.sqrt(np.maximum((z1 - (1 + alpha)) ** 2 - 4 * alpha, 0)))
    term1 = np.sum(z2 - np.log(np.maximum(z2, 1e-300)))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return float(term1 + term2 + term3 + term4)
