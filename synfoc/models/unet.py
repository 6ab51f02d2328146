"""The conventional model of SynFoC: the classic U-Net (4 down, 4 up, BatchNorm, transposed-conv up)."""

from __future__ import annotations

import torch
from torch import nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    """(3x3 conv, BatchNorm, ReLU) twice."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = _double_conv(2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net with widths w, 2w, 4w, 8w, 16w. Input side must be divisible by 16.

    Args:
        in_channels: image channels (1 grey, 3 RGB).
        num_classes: foreground classes C; the network outputs C+1 logits.
        base_width: w (the paper uses 64).
    """

    def __init__(self, in_channels: int, num_classes: int, base_width: int = 64) -> None:
        super().__init__()
        w = [base_width * 2**i for i in range(5)]
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stem = _double_conv(in_channels, w[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _double_conv(w[i], w[i + 1])) for i in range(4))
        self.up = nn.ModuleList(_Up(w[i + 1], w[i]) for i in reversed(range(4)))
        self.head = nn.Conv2d(w[0], num_classes + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"U-Net input size {tuple(x.shape[-2:])} must be divisible by 16")
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)


def build_unet(in_channels: int, num_classes: int, base_width: int = 64) -> UNet:
    """The U-Net of the spec (section 2) mapping (B, in_channels, S, S) to (B, C+1, S, S) logits."""
    return UNet(in_channels, num_classes, base_width)
