"""Built-in block factorisers: ``svd`` and ``tucker2`` (how HSC factorises one (region, cluster) block).

``svd`` keeps the top eigenvectors of the block's output second moment (reduced-rank regression:
the discarded eigenvalues are exactly the calibration error). ``tucker2`` is data-aware Tucker-2 of
the block: output factor from the block's output moment, input factor from the SVD of the
block's weight whitened by the region's input channel moment — two ranks per block. With one
region and one cluster they are data-aware Global SVD and data-aware Tucker-2, factor for factor.
"""

from __future__ import annotations

import torch

from hsc_plugin.decomposition import Tucker2Bases
from hsc_plugin.plan import RankBlock
from hsc_plugin.registry import hookimpl
from hsc_plugin.strategy import Block, BlockFactoriser, BlockFactors

__all__ = ["SVDBlock", "Tucker2Block", "SVDFactors", "Tucker2Factors"]


class SVDFactors(BlockFactors):
    """Top-k eigenvectors P of the block's output moment: reduce = Pᵀ W_b, expand = P."""

    structure = "svd"

    def __init__(self, block: Block) -> None:
        evals, evecs = block.output.eig()
        W = block.weight
        k = min(W.shape[0], W.shape[1] * W.shape[2] * W.shape[3])
        self.basis = evecs[:, :k]
        self.spectrum = evals[:k]
        self.weight = W
        super().__init__([RankBlock(evals[:k].cpu().numpy(), label=block.label, min_rank=0)], float(evals[:k].sum()))

    def factors(self, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        P = self.basis[:, :ranks[0]]
        W = self.weight
        return (P.T @ W.reshape(W.shape[0], -1)).reshape(-1, *W.shape[1:]), P


class Tucker2Factors(BlockFactors):
    """Data-aware Tucker-2 of the block; kept energy modelled as the product of the two modes'
    kept fractions (truncating both compounds), as the Tucker-2 compressor does."""

    structure = "tucker2"

    def __init__(self, block: Block) -> None:
        W = block.weight
        # The moments' eigen-decompositions and the whitening, once: factors() at any ranks
        # is then a slice and a contraction.
        self.bases = Tucker2Bases(W, block.output, block.inputs)
        kk = W.shape[2] * W.shape[3]
        e_out, e_in = self.bases.energies_out, self.bases.energies_in
        e_out, e_in = e_out[: min(W.shape[0], W.shape[1] * kk)], e_in[: min(W.shape[1], W.shape[0] * kk)]
        self.energy = float(e_out.sum())  # the block's output energy (what "retained" is a share of)
        super().__init__([RankBlock(e_out.cpu().numpy(), label=f"{block.label}out", min_rank=0),
                          RankBlock(e_in.cpu().numpy(), label=f"{block.label}in", min_rank=1)], self.energy)

    def retained(self, ranks: list[int]) -> float:
        fractions = [b.energies[:r].sum() / b.total if b.total > 0 else 1.0 for r, b in zip(ranks, self.rank_blocks)]
        return float(self.total * fractions[0] * fractions[1])

    def factors(self, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        U_out, core, V_in = self.bases.factors(*ranks)
        return V_in.T, core, U_out


class SVDBlock(BlockFactoriser):
    """One rank per block: the reduced-rank-regression optimum of the block's outputs."""

    name = "svd"

    def factorise(self, block: Block) -> BlockFactors:
        return SVDFactors(block)


class Tucker2Block(BlockFactoriser):
    """Two ranks per block (input and output mode): 1×1 → k×k core → 1×1, data-aware."""

    name = "tucker2"
    needs_inputs = True

    def factorise(self, block: Block) -> BlockFactors:
        return Tucker2Factors(block)


@hookimpl
def hsc_block_factorisers() -> list[type]:
    return [SVDBlock, Tucker2Block]
