"""The recognisers: a ResNet applied to every sampled frame + average consensus + linear head.

Four models share this code (docs/design.md "Training recipe"): TSN and TSM on the standard ResNet
("ResNet-B", stride in the 3x3 conv), PP-TSN and PP-TSM on ResNet-vd (deep 3x3 stem, average-pool
shortcut downsampling); the TSM models add a temporal shift on every residual branch. PP-TSMv2 puts
PP-LCNetV2 (trainer/pptsmv2.py) in the ResNet's place, under the same head.
``build_model(cfg)`` is the one factory; the width is a parameter so that the CPU demos can use a
narrow ResNet-18.
"""

from __future__ import annotations

import paddle
import paddle.nn as nn

from common.log import get_logger

from .config import ARCHITECTURES, DEPTHS
from .pptsmv2 import PPLCNetV2TSM
from .weights import load_pretrained

log = get_logger(__name__)


def temporal_shift(x, num_segments: int, shift_div: int = 8):
    """TSM's shift of [N*T, C, H, W] along T: channels [0, C/div) take the previous segment's values,
    [C/div, 2C/div) the next segment's, the rest stay; zeros enter at the ends of each clip. The
    directions are Paddle's ``F.temporal_shift`` (so PaddleVideo's TSM weights apply), written with
    slices and concatenation (no in-place ops, no custom op) so that it exports to ONNX."""
    c, h, w = x.shape[1:]
    fold = c // shift_div
    x = x.reshape([-1, num_segments, c, h, w])
    zeros = paddle.zeros_like(x[:, :1, :fold])
    from_prev = paddle.concat([zeros, x[:, :-1, :fold]], axis=1)
    from_next = paddle.concat([x[:, 1:, fold : 2 * fold], zeros], axis=1)
    return paddle.concat([from_prev, from_next, x[:, :, 2 * fold :]], axis=2).reshape([-1, c, h, w])


def _activation(act: str) -> nn.Layer:
    return nn.LeakyReLU() if act == "leaky_relu" else nn.ReLU()


def _conv_bn(cin, cout, k, stride=1, act="relu"):
    """Conv (no bias) + BN (+ activation unless ``act`` is None): keys ``.0.weight``, ``.1.*``."""
    layers = [
        nn.Conv2D(
            cin, cout, k, stride=stride, padding=k // 2, bias_attr=False, weight_attr=nn.initializer.KaimingNormal()
        ),
        nn.BatchNorm2D(cout),
    ]
    if act:
        layers.append(_activation(act))
    return nn.Sequential(*layers)


class BasicBlock(nn.Layer):
    expansion = 1

    def __init__(self, cin, width, stride, vd=False, shift=None, act="relu"):
        super().__init__()
        cout = width * self.expansion
        self.branch = self._branch(cin, width, cout, stride, act)
        self.shortcut, self.pool = None, None
        if stride != 1 or cin != cout:
            # ResNet-vd downsamples the shortcut with an average pool instead of a strided 1x1 conv,
            # which would skip 3/4 of the activations
            if vd and stride != 1:
                self.pool = nn.AvgPool2D(stride, stride, ceil_mode=True)
                stride = 1
            self.shortcut = _conv_bn(cin, cout, 1, stride, act=None)
        self.shift = shift  # (num_segments, shift_div) or None
        self.relu = _activation(act)

    def _branch(self, cin, width, cout, stride, act):
        return nn.Sequential(_conv_bn(cin, width, 3, stride, act), _conv_bn(width, cout, 3, act=None))

    def forward(self, x):
        identity = x
        if self.shortcut is not None:
            identity = self.shortcut(x if self.pool is None else self.pool(x))
        # TSM's residual shift: the branch sees shifted features, the identity path keeps the frame's own
        branch_in = x if self.shift is None else temporal_shift(x, *self.shift)
        return self.relu(self.branch(branch_in) + identity)


class Bottleneck(BasicBlock):
    expansion = 4

    def _branch(self, cin, width, cout, stride, act):
        return nn.Sequential(
            _conv_bn(cin, width, 1, act=act), _conv_bn(width, width, 3, stride, act), _conv_bn(width, cout, 1, act=None)
        )


class ResNet(nn.Layer):
    """ResNet-18/34/50/101 without its classifier; returns pooled features [B, out_channels].

    ``variant`` "b" is the standard ResNet, "vd" ResNet-vd; ``num_segments`` (with ``shift_div``) adds
    TSM's temporal shift, the batch then holding consecutive groups of ``num_segments`` frames."""

    def __init__(
        self,
        depth: int = 50,
        base_channels: int = 64,
        variant: str = "b",
        *,
        num_segments: int | None = None,
        shift_div: int = 8,
        act: str = "relu",
    ):
        super().__init__()
        blocks = DEPTHS[depth].stage_blocks
        self.depth, self.variant = depth, variant
        block = BasicBlock if DEPTHS[depth].block == "basic" else Bottleneck
        c = base_channels
        if variant == "vd":
            self.stem = nn.Sequential(
                _conv_bn(3, c // 2, 3, 2, act),
                _conv_bn(c // 2, c // 2, 3, 1, act),
                _conv_bn(c // 2, c, 3, 1, act),
                nn.MaxPool2D(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(_conv_bn(3, c, 7, 2, act), nn.MaxPool2D(3, 2, 1))
        shift = (num_segments, shift_div) if num_segments else None
        stages, cin = [], c
        for i, n in enumerate(blocks):
            width = c * 2**i
            for j in range(n):
                stages.append(block(cin, width, 2 if j == 0 and i > 0 else 1, variant == "vd", shift, act))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.out_channels = cin

    def forward(self, x):
        return self.pool(self.stages(self.stem(x))).flatten(1)


class ConsensusHead(nn.Layer):
    """Average consensus over a sample's views, dropout, linear classifier initialised N(0, init_std)."""

    def __init__(self, in_channels, num_classes, dropout=0.4, init_std=0.01):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.fc = nn.Linear(
            in_channels,
            num_classes,
            weight_attr=nn.initializer.Normal(0.0, init_std),
            bias_attr=nn.initializer.Constant(0.0),
        )

    def forward(self, feats, num_views):
        x = feats.reshape([-1, num_views, feats.shape[-1]]).mean(axis=1)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


class Recognizer2D(nn.Layer):
    """Input [N, V, 3, H, W] -> class logits [N, num_classes]. V is the segments of one clip in training,
    crops x clips x segments (segments innermost) in testing: the backbone sees consecutive groups of
    segments, so TSM shifts only within a clip, and the head averages over all V."""

    def __init__(self, backbone: ResNet, head: ConsensusHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        n, v = x.shape[0], x.shape[1]
        feats = self.backbone(x.reshape([n * v] + list(x.shape[2:])))
        return self.head(feats, v)


def build_model(cfg) -> Recognizer2D:
    b, h = cfg.MODEL.backbone, cfg.MODEL.head
    arch = ARCHITECTURES[cfg.MODEL.name]
    head_dropout = h.dropout
    if arch.backbone == "PP-LCNetV2":
        # PP-TSMv2 drops out each frame's features inside the backbone (PaddleVideo's order); its head only
        # averages the segments and classifies. base_channels 64 is PaddleVideo's scale 1.0.
        backbone = PPLCNetV2TSM(
            b.base_channels / 64,
            num_segments=cfg.PIPELINE.num_segments,
            temporal_attention=b.temporal_attention,
            dropout=h.dropout,
        )
        head_dropout = 0.0
    else:
        backbone = ResNet(
            b.depth,
            b.base_channels,
            arch.resnet,
            shift_div=b.shift_div,
            act=arch.activation,
            num_segments=cfg.PIPELINE.num_segments if arch.temporal_shift else None,
        )
    model = Recognizer2D(backbone, ConsensusHead(backbone.out_channels, h.num_classes, head_dropout, h.init_std))
    if b.pretrained:
        log.info(load_pretrained(model, b.pretrained))
    return model
