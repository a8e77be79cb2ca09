"""The benchmark's three models, in plain torch: a ResNet-50, a ViT-S/16 and a tiny CNN."""

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50's layout: 25.6M parameters, 320 state tensors (161 of them BatchNorm buffers)."""
    layers, cin = (
        [
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ],
        64,
    )
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


class ViT(nn.Module):
    """ViT-S/16's layout: 384 wide, 12 pre-norm blocks of 6 heads, 22M parameters."""

    def __init__(
        self, image: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, num_classes: int = 1000
    ):
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, 6, 4 * dim, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patches(x).flatten(2).transpose(1, 2)
        x = self.blocks(torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos)
        return self.head(self.norm(x[:, 0]))


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A small CIFAR-style CNN: 13 conv-BatchNorm blocks, 0.3M parameters, 80 state tensors."""
    layers, cin = [], 3
    for i, cout in enumerate((16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64, 64, 64)):
        stride = 2 if i in (2, 5, 9) else 1
        layers += [
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


MODELS = {"ResNet-50": resnet50, "ViT-S/16": ViT, "tiny CNN": tiny_cnn}
