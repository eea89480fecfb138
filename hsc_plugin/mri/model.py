"""AlexNet-style classifier for the brain-MRI experiment.

The paper uses "the AlexNet layout adapted to 1 input channel and 4 classes, input size
configurable". :func:`alexnet_mri` builds exactly that from standard layers only (``Conv2d``,
``BatchNorm2d``, ``ReLU``, ``MaxPool2d``, ``AdaptiveAvgPool2d``, ``Dropout``, ``Flatten``,
``Linear``) held in two plain ``nn.Sequential`` attributes, ``features`` and ``classifier``, like
torchvision's AlexNet, so any compressor that walks ``named_modules()`` can replace its convs.

Layout (``w`` = width multiplier, channels rounded to multiples of 8)::

    conv1 11x11 / s (1 -> 64w)  BN ReLU  maxpool 3/2
    conv2  5x5      (-> 192w)   BN ReLU  maxpool 3/2
    conv3  3x3      (-> 384w)   BN ReLU
    conv4  3x3      (-> 256w)   BN ReLU
    conv5  3x3      (-> 256w)   BN ReLU  maxpool 3/2
    adaptive avg-pool 2x2, dropout, linear(-> 512w), ReLU, dropout, linear(-> 512w), ReLU,
    linear(-> classes)

The stem stride ``s = round(input_size / 32)`` keeps conv1's output at about 32x32 whatever the
input size, so conv2 runs at 16x16 and conv3-5 at 8x8 for 64, 96 and 128 px inputs: the layers the
compressors target keep a map large enough for spatial regions. (torchvision's stride-4 stem
would leave conv3-5 at 3x3 for a 64 px input.) The model still accepts any input size at run time.

Measured with ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2, one sample; the
counter sees convs and linears, not BN/ReLU/pooling). The stem keeps conv1's output at 32x32, so
MACs are the same at 64, 96 and 128 px:

==========  =====  ========  ==========  ==========================================
input px    width  MACs (M)  params (M)  conv1-5 output maps / channels
==========  =====  ========  ==========  ==========================================
64          0.25     15.5      0.206     32,16,8,8,8 px / 16,48,96,64,64
64/96/128   0.5      58.0      0.815     32,16,8,8,8 px / 32,96,192,128,128
128         1.0     224.2      3.246     32,16,8,8,8 px / 64,192,384,256,256
==========  =====  ========  ==========  ==========================================

Per conv at width 0.5 (M MACs): conv1 4.0, conv2 19.7, conv3 10.6, conv4 14.2, conv5 9.4;
the classifier adds 0.2. ``paper_recipe()`` (128 px) and ``demo_recipe()`` (96 px) both use
width 0.5.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["alexnet_mri"]

_CHANNELS = (64, 192, 384, 256, 256)
_HIDDEN = 512
_POOL = 2


def _round8(x: float) -> int:
    """Round a channel count to a multiple of 8 (at least 8) so CPU kernels stay efficient."""
    return max(8, int(round(x / 8.0)) * 8)


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int, padding: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=padding),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def alexnet_mri(
    num_classes: int = 4,
    in_chans: int = 1,
    width: float = 1.0,
    input_size: int = 128,
    *,
    dropout: float = 0.5,
) -> nn.Module:
    """Build the AlexNet-layout classifier of the paper.

    Args:
        num_classes: output classes (4 for brain-MRI).
        in_chans: input channels (1 for grayscale MRI).
        width: channel multiplier; 0.5 trains in minutes on two CPU cores.
        input_size: the square input size the stem is tuned for (stride ``round(input_size/32)``).
        dropout: dropout probability of the classifier MLP.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if input_size < 8:
        raise ValueError(f"input_size must be >= 8, got {input_size}")
    c1, c2, c3, c4, c5 = (_round8(c * width) for c in _CHANNELS)
    hidden = _round8(_HIDDEN * width)
    stride = max(1, round(input_size / 32))
    features = nn.Sequential(
        *_conv_bn_relu(in_chans, c1, 11, stride, 5),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        *_conv_bn_relu(c1, c2, 5, 1, 2),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        *_conv_bn_relu(c2, c3, 3, 1, 1),
        *_conv_bn_relu(c3, c4, 3, 1, 1),
        *_conv_bn_relu(c4, c5, 3, 1, 1),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    classifier = nn.Sequential(
        nn.Flatten(1),
        nn.Dropout(dropout),
        nn.Linear(c5 * _POOL * _POOL, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
    return _AlexNetMRI(features, nn.AdaptiveAvgPool2d((_POOL, _POOL)), classifier)


class _AlexNetMRI(nn.Module):
    """features -> avgpool -> classifier, the torchvision AlexNet structure."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)))
