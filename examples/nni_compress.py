"""An NNI compression recipe with hsc-plugin's low-rank compressor in it.

    python examples/nni_compress.py            # bundled brain-MRI sample, CPU, well under a minute

1. a model, an NNI ``config_list`` and a ``TorchEvaluator`` (traced optimizer, training function);
2. ``LowRankCompressor(model, config_list, evaluator).compress()``: Global SVD at 2x fewer MACs,
   calibrated on the evaluator's own training batches;
3. NNI's ``L1NormPruner`` on the factorised model (output channels of the factor layers, ranks
   left alone) and ``ModelSpeedup`` (through ``hsc_plugin.adapters.nni.speedup``, which applies the
   torch.fx workaround);
4. fine-tuning through the evaluator, every new parameter in the optimizer;
5. MACs (per sample) and test accuracy at each stage.

The model is tiny and trained for a few steps only: the accuracies show the workflow runs, not
what the method reaches (see the README for real experiments).
"""

from __future__ import annotations

import argparse
import logging
import warnings

import nni
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from nni.compression.pruning import L1NormPruner
from torch.utils.data import DataLoader

from hsc_plugin import measure_costs
from hsc_plugin.adapters.nni import LowRankCompressor, finetune, speedup
from hsc_plugin.mri.data import bundled_sample_path, load_split
from hsc_plugin.mri.model import alexnet_mri

SIZE = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per stage")
    ap.add_argument("--per-class", type=int, default=32, help="training images per class")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import nni.compression.speedup  # noqa: F401  (imported here so that its log level can be set)

    logging.getLogger("nni").setLevel(logging.WARNING)  # ModelSpeedup logs every module at INFO
    quiet = logging.getLogger("nni_compress.speedup")
    quiet.setLevel(logging.WARNING)

    root = bundled_sample_path()
    train = load_split(root, "train", size=SIZE, max_per_class=args.per_class)
    test = load_split(root, "test", size=SIZE, max_per_class=16)
    train_loader = DataLoader(train, batch_size=16, shuffle=True)

    # -- the NNI evaluator: training function, traced optimizer, training step ---------------
    def training_step(batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        step = 0
        for _ in range(max_epochs or 100):
            for batch in train_loader:
                optimizers.zero_grad()
                training_step(batch, model).backward()
                optimizers.step()
                step += 1
                if max_steps is not None and step >= max_steps:
                    return

    @torch.no_grad()
    def evaluating_func(model):
        model.eval()
        x, y = test.tensors
        return (model(x).argmax(1) == y).float().mean().item()

    model = alexnet_mri(num_classes=4, in_chans=1, width=0.25, input_size=SIZE)
    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.05, momentum=0.9)
    evaluator = TorchEvaluator(training_func, optimizer, training_step, evaluating_func=evaluating_func,
                               dummy_input=torch.randn(1, 1, SIZE, SIZE))
    training_func(model, optimizer, training_step, max_steps=args.steps)  # a briefly trained "pretrained" model
    model.eval()
    example = torch.randn(1, 1, SIZE, SIZE)
    rows = [("dense", measure_costs(model, example).macs, evaluating_func(model))]

    # -- our compressor, configured like any NNI compressor ---------------------------------
    config_list = [{
        "op_types": ["Conv2d", "Linear"],
        "exclude_op_names": ["features.0"],  # keep the stem dense
        "method": "global_svd",
        "macs_ratio": 2.0,
        "data_aware": True,
    }]
    compressor = LowRankCompressor(model, config_list, evaluator, calib_batches=4)
    lowrank, report = compressor.compress()
    print(report.table())
    rows.append(("global_svd 2x", report.macs_after, evaluating_func(lowrank)))

    # -- then NNI's own pruner + ModelSpeedup on the factorised model -----------------------
    prune_config = [{
        "op_names_re": [r"features\.\d+\.expand$"],  # output channels of the factorised convs
        "sparse_ratio": 0.25,
    }]
    pruner = L1NormPruner(lowrank, prune_config)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    speedup(lowrank, torch.randn(2, 1, SIZE, SIZE), masks, logger=quiet)
    lowrank.eval()
    rows.append(("+ L1NormPruner 25% + speedup", measure_costs(lowrank, example).macs, evaluating_func(lowrank)))

    # -- fine-tune through the evaluator: factor parameters included -------------------------
    finetune(lowrank, evaluator, max_steps=args.steps)
    lowrank.eval()
    rows.append(("+ fine-tuned", measure_costs(lowrank, example).macs, evaluating_func(lowrank)))

    print(f"\n{'stage':<32} {'MACs/sample':>12} {'vs dense':>9} {'test acc':>9}")
    for name, macs, acc in rows:
        print(f"{name:<32} {macs:>12,} {rows[0][1] / macs:>8.2f}x {acc:>9.3f}")


if __name__ == "__main__":
    main()
