"""fold_bn: BatchNorm folded into the preceding (dense or factorised) conv gives the same outputs."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from hsc_plugin import Budget, compress, fold_bn
from hsc_plugin.mri import alexnet_mri

from _factories import FORMS, factorise_convs, randomise_bn, tiny_cnn


def _small() -> nn.Module:
    return randomise_bn(tiny_cnn())


def _alexnet() -> nn.Module:
    torch.manual_seed(0)
    m = alexnet_mri(width=0.25, input_size=64)
    return randomise_bn(m)


def _resnet18() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomise_bn(timm.create_model("resnet18", pretrained=False, num_classes=4))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "tiny": (_small, (3, 32, 32)),
    "alexnet_mri": (_alexnet, (1, 64, 64)),
    "resnet18": (_resnet18, (3, 64, 64)),
}
METHODS = {
    "dense": None,
    "hsc-input": ("hsc", {"channel_side": "input"}),
    "hsc-output": ("hsc", {"channel_side": "output"}),
    "global_svd": ("global_svd", {}),
    "tucker2": ("tucker2", {}),
    **{form: form for form in FORMS},  # forms no compressor makes yet: built from the dense convs
}


def _bn_count(m: nn.Module) -> int:
    return sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_fold_bn_gives_equal_outputs(arch: str, method: str) -> None:
    factory, shape = MODELS[arch]
    model = factory()
    if isinstance(METHODS[method], str):
        model = factorise_convs(model, METHODS[method]).eval()
    elif METHODS[method] is not None:
        name, kw = METHODS[method]
        calib = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
        model = compress(model, name, calib=calib, budget=Budget(3.0), progress=False, **kw).model.eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = _bn_count(model)
    with torch.no_grad():
        ref = model(x)
        folded = fold_bn(model)
        out = folded(x)
    assert n_bn > 0
    assert len(folded.folded_bn) == n_bn - _bn_count(folded) > 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert _bn_count(model) == n_bn  # the user's model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_inplace_and_train_mode() -> None:
    model = _small()
    same = fold_bn(model, inplace=True)
    assert same is model and _bn_count(model) == 0
    with pytest.raises(RuntimeError, match="eval mode"):
        fold_bn(tiny_cnn().train())
