"""Model definitions the example notebooks share, in plain torch, so an inference notebook rebuilds the
exact network that a training notebook saved weights for."""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut: ResNet's block for small networks.

    The last BatchNorm starts at zero, so each block begins as the identity and a deep stack trains
    from the first step like a shallow one.

    Example:
        >>> import torch
        >>> BasicBlock(8, 16, stride=2)(torch.zeros(1, 8, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        nn.init.zeros_(self.body[-1].weight)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for images of any size: a 3x3 stem, stages of ``BasicBlock`` s, global pooling.

    Stage ``i`` has ``blocks[i]`` blocks of ``width * 2**i`` channels; each stage after the first halves
    the resolution. The defaults (about 0.7 M weights) suit small images such as 32x32 digits; on
    Kaggle's GPUs, wider and deeper settings or a timm model fit bigger images.

    Example:
        >>> import torch
        >>> model = ResNet(num_classes=10, in_channels=3, width=16)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> ResNet(in_channels=1, stem_stride=2).stem(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 32, 14, 14])
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        width: int = 32,  # channels of the first stage; doubled at each later stage
        blocks: tuple[int, ...] = (1, 1, 1),  # blocks per stage
        stem_stride: int = 1,  # 2 halves the resolution at once: cheaper for images of 28 pixels and more
        dropout: float = 0.1,  # before the classifier
    ):
        super().__init__()
        checked = [("num_classes", num_classes), ("in_channels", in_channels), ("width", width),
                   ("stem_stride", stem_stride)]
        for name, value in checked:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if not blocks or not all(isinstance(b, int) and b >= 1 for b in blocks):
            raise ValueError(f"blocks must be a non-empty tuple of ints >= 1 (per stage), got {blocks!r}.")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages, channels = [], width
        for index, count in enumerate(blocks):
            out_channels = width * 2**index
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out_channels, stride=stride))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
        )

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))
