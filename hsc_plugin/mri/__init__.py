"""The brain-MRI experiment of the paper: data loader, AlexNet-style model, training, metrics.

    from hsc_plugin.mri import alexnet_mri, default_data_path, load_split, evaluate
    from hsc_plugin.mri.train import train
    data = default_data_path()                # $HSC_MRI_DATA or the bundled sample
    tr, te = load_split(data, "train"), load_split(data, "test")
    model = alexnet_mri(width=0.5, input_size=64)
    train(model, tr, epochs=15, lr=2e-3, batch_size=64, seed=0)
    y_true, y_pred = evaluate(model, te)

``train`` is deliberately not re-exported here: a package attribute named ``train`` would shadow
the ``hsc_plugin.mri.train`` module.
"""

from hsc_plugin.mri.data import (
    CLASSES,
    MEAN,
    STD,
    bundled_sample_path,
    default_data_path,
    load_split,
)
from hsc_plugin.mri.metrics import (
    bootstrap_se,
    classification_metrics,
    confusion_matrix,
    format_table,
)
from hsc_plugin.mri.model import alexnet_mri
from hsc_plugin.mri.train import (
    TrainRecipe,
    cache_dir,
    demo_recipe,
    evaluate,
    finetune,
    load_or_train,
    model_cache_name,
    paper_recipe,
)

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "TrainRecipe",
    "alexnet_mri",
    "bootstrap_se",
    "bundled_sample_path",
    "cache_dir",
    "classification_metrics",
    "confusion_matrix",
    "default_data_path",
    "demo_recipe",
    "evaluate",
    "finetune",
    "format_table",
    "load_or_train",
    "load_split",
    "model_cache_name",
    "paper_recipe",
]
