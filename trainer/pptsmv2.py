"""PP-TSMv2's backbone: PP-LCNetV2 applied to every frame, one temporal shift (with a lightweight temporal
attention before it) in front of stage 3, and a 1x1 convolution to 1280 channels (docs/models.md "PP-TSMv2").

The depthwise convolutions of stages 3 and 4 train as several parallel conv+BN branches (kernels 5, 3 and
1) whose sum is one convolution: ``reparameterize()`` folds them into it for inference and export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


@dataclass(frozen=True)
class Stage:
    """One PP-LCNetV2 stage at scale 1.0: blocks of a depthwise conv then pointwise conv(s)."""

    width: int  # input channels of the stage; every block outputs twice that
    kernel: int  # depthwise kernel (the largest branch of a re-parameterisable block)
    split_pw: bool  # the pointwise conv as two: to half the output width, then to the full width
    rep: bool  # depthwise branches of kernels kernel, kernel-2, ..., 1, summed (one conv at inference)
    se: bool  # squeeze-and-excitation after the depthwise conv
    shortcut: bool  # identity shortcut where input and output shapes agree


STAGES = (
    Stage(64, 3, False, False, False, False),
    Stage(128, 3, False, False, False, False),
    Stage(256, 5, True, True, True, False),
    Stage(512, 5, False, True, False, True),
)
DEPTHS = (2, 2, 6, 2)  # PP-LCNetV2 base
SHIFT_STAGE = 2  # the temporal attention and the one shift act on stage 3's input
EXPAND = 1280  # channels of the last 1x1 convolution


def make_divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), never 10% below ``v``:
    the channel rounding of the MobileNet family, which PP-LCNetV2's weights are shaped by."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) + BN (+ ReLU): keys ``.0.weight``, ``.1.*``, as the ResNets of trainer.models."""
    layers = [
        nn.Conv2D(
            cin,
            cout,
            k,
            stride=stride,
            padding=(k - 1) // 2,
            groups=groups,
            bias_attr=False,
            weight_attr=nn.initializer.KaimingNormal(),
        ),
        nn.BatchNorm2D(cout),
    ]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def shift_bounds(channels: int, num_segments: int) -> tuple[int, int]:
    """(c1, c2): channels [0, c1) take the previous segment's values, [c1, c2) the next one's, for a
    shift ratio of 1/num_segments, rounded as Paddle's ``F.temporal_shift`` rounds them (in float32)."""
    ratio = np.float32(1.0 / num_segments)
    return int(np.float32(channels) * ratio), int(np.float32(2 * channels) * ratio)


def temporal_shift(x, num_segments: int):
    """Paddle's ``F.temporal_shift(x, num_segments, 1 / num_segments)`` written with slices and
    concatenation, so that it exports to ONNX (see trainer.models.temporal_shift)."""
    c, h, w = x.shape[1:]
    c1, c2 = shift_bounds(c, num_segments)
    x = x.reshape([-1, num_segments, c, h, w])
    from_prev = paddle.concat([paddle.zeros_like(x[:, :1, :c1]), x[:, :-1, :c1]], axis=1)
    from_next = paddle.concat([x[:, 1:, c1:c2], paddle.zeros_like(x[:, :1, c1:c2])], axis=1)
    return paddle.concat([from_prev, from_next, x[:, :, c2:]], axis=2).reshape([-1, c, h, w])


class TemporalAttention(nn.Layer):
    """PP-TSMv2's lightweight temporal attention: each segment's global average -> a num_segments x
    num_segments linear layer -> sigmoid -> each segment's features scaled by its weight."""

    def __init__(self, num_segments: int):
        super().__init__()
        self.num_segments = num_segments
        self.fc = nn.Linear(num_segments, num_segments)

    def forward(self, x):
        c, h, w = x.shape[1:]
        clips = x.reshape([-1, self.num_segments, c, h, w])
        weights = F.sigmoid(self.fc(clips.mean(axis=[2, 3, 4])))
        return (clips * weights.reshape([-1, self.num_segments, 1, 1, 1])).reshape([-1, c, h, w])


class SqueezeExcite(nn.Layer):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.reduce = nn.Conv2D(channels, channels // reduction, 1)
        self.expand = nn.Conv2D(channels // reduction, channels, 1)

    def forward(self, x):
        w = F.adaptive_avg_pool2d(x, 1)
        return x * F.sigmoid(self.expand(F.relu(self.reduce(w))))


def _fused(branch: nn.Sequential, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel zero-padded to size x size, bias) of one conv + BN in inference mode, in float64 so that the
    folded weights are rounded to float32 once."""
    conv, bn = branch[0], branch[1]
    std = np.sqrt(bn._variance.numpy().astype(np.float64) + bn._epsilon)
    scale = bn.weight.numpy().astype(np.float64) / std
    kernel = conv.weight.numpy().astype(np.float64) * scale.reshape([-1, 1, 1, 1])
    pad = (size - kernel.shape[-1]) // 2
    kernel = np.pad(kernel, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    return kernel, bn.bias.numpy() - bn._mean.numpy().astype(np.float64) * scale


class DepthwiseSeparable(nn.Layer):
    """PP-LCNetV2's block: depthwise conv + ReLU, [SE], pointwise conv(s) + BN + ReLU, [+ input]."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, spec: Stage | None = None):
        super().__init__()
        spec = spec or Stage(cin, kernel, False, False, False, False)
        self.kernel, self.stride, self.channels = kernel, stride, cin
        self.rep, self.repped = spec.rep, False
        if spec.rep:
            # a stride-2 block has no 1x1 branch (PP-LCNetV2 leaves it out)
            sizes = [k for k in range(kernel, 0, -2) if k > 1 or stride == 1]
            self.dw_branches = nn.LayerList([conv_bn(cin, cin, k, stride, cin, act=False) for k in sizes])
        else:
            self.dw = conv_bn(cin, cin, kernel, stride, cin)
        self.se = SqueezeExcite(cin) if spec.se else None
        widths = [int(cout * 0.5), cout] if spec.split_pw else [cout]
        self.pw = nn.Sequential(*[conv_bn(a, b, 1) for a, b in zip([cin] + widths[:-1], widths)])
        self.shortcut = spec.shortcut and stride == 1 and cin == cout

    def forward(self, x):
        if not self.rep:
            y = self.dw(x)
        elif self.repped:
            y = F.relu(self.dw_fused(x))
        else:
            y = self.dw_branches[0](x)
            for branch in self.dw_branches[1:]:
                y = y + branch(x)
            y = F.relu(y)
        if self.se is not None:
            y = self.se(y)
        y = self.pw(y)
        return y + x if self.shortcut else y

    def reparameterize(self) -> None:
        """Fold the depthwise branches (BN in inference mode) into ``dw_fused``, one conv with a bias, and
        drop the branches: the block computes the same in eval mode and can no longer train."""
        if not self.rep or self.repped:
            return
        parts = [_fused(b, self.kernel) for b in self.dw_branches]
        fused = nn.Conv2D(
            self.channels, self.channels, self.kernel, self.stride, (self.kernel - 1) // 2, groups=self.channels
        )
        fused.weight.set_value(sum(k for k, _ in parts).astype("float32"))
        fused.bias.set_value(sum(b for _, b in parts).astype("float32"))
        self.dw_fused = fused
        del self.dw_branches
        self.repped = True


class PPLCNetV2TSM(nn.Layer):
    """PP-LCNetV2 base (depths 2, 2, 6, 2) with PP-TSMv2's temporal modelling; returns per-frame features
    [N*T, 1280] after ReLU and dropout. The batch holds consecutive groups of ``num_segments`` frames.

    ``scale`` widens or narrows every stage (1.0 is PaddleVideo's; the CPU tests use 0.125). Dropout is
    PaddleVideo's "downscale_in_infer" (features are scaled by 1 - p at inference), so that its weights
    give its logits."""

    def __init__(self, scale: float = 1.0, *, num_segments: int, temporal_attention: bool = True, dropout: float = 0.2):
        super().__init__()
        self.num_segments = num_segments
        c32, c64 = make_divisible(32 * scale), make_divisible(64 * scale)
        self.stem = nn.Sequential(conv_bn(3, c32, 3, 2), DepthwiseSeparable(c32, c64, 1, 3))
        stages, cin = [], c64
        for spec, n in zip(STAGES, DEPTHS):
            cout = make_divisible(2 * spec.width * scale)
            blocks = []
            for j in range(n):
                blocks.append(DepthwiseSeparable(cin, cout, 2 if j == 0 else 1, spec.kernel, spec))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.LayerList(stages)
        self.temporal_attention = TemporalAttention(num_segments) if temporal_attention else None
        self.last_conv = nn.Conv2D(cin, EXPAND, 1, bias_attr=False, weight_attr=nn.initializer.KaimingNormal())
        self.dropout = nn.Dropout(dropout, mode="downscale_in_infer") if dropout > 0 else None
        self.out_channels = EXPAND

    def forward(self, x):
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i == SHIFT_STAGE:
                if self.temporal_attention is not None:
                    x = self.temporal_attention(x)
                x = temporal_shift(x, self.num_segments)
            x = stage(x)
        x = F.relu(self.last_conv(F.adaptive_avg_pool2d(x, 1)))
        if self.dropout is not None:
            x = self.dropout(x)
        return x.flatten(1)

    def stage_prefixes(self) -> list[list[str]]:
        """Parameter-name prefixes of [stem, stage 1, ..., stage 4] (OPTIMIZER.stage_lr_mult)."""
        return [["stem"]] + [[f"stages.{i}"] for i in range(len(self.stages))]

    def reparameterize(self) -> PPLCNetV2TSM:
        """Fold every re-parameterisable block into one depthwise conv (for inference; see the block's)."""
        for layer in self.sublayers():
            if isinstance(layer, DepthwiseSeparable):
                layer.reparameterize()
        return self
