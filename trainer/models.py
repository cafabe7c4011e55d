"""TSN = ResNet backbone applied to every segment + head (average consensus, dropout, linear).

``build_model(cfg)`` is the one factory; the backbone width is a parameter so that the CPU demo can use
a narrow ResNet-18 while the production configs keep the standard ResNet-50.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def _conv_bn(cin, cout, k, stride=1, act=True):
    layers = [nn.Conv2D(cin, cout, k, stride=stride, padding=k // 2, bias_attr=False,
                        weight_attr=nn.initializer.KaimingNormal()),
              nn.BatchNorm2D(cout)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Layer):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.branch = nn.Sequential(_conv_bn(cin, width, 3, stride), _conv_bn(width, cout, 3, act=False))
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.branch(x) + identity)


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, cin, width, stride):
        nn.Layer.__init__(self)
        cout = width * self.expansion
        self.branch = nn.Sequential(_conv_bn(cin, width, 1), _conv_bn(width, width, 3, stride),
                                    _conv_bn(width, cout, 1, act=False))
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()


class ResNet(nn.Layer):
    """ResNet-18/34/50/101 without its classifier; returns pooled features [B, out_channels]."""

    def __init__(self, depth: int = 50, base_channels: int = 64):
        super().__init__()
        kind, blocks = DEPTHS[depth]
        self.depth = depth
        block = BasicBlock if kind == "basic" else Bottleneck
        self.stem = nn.Sequential(_conv_bn(3, base_channels, 7, 2), nn.MaxPool2D(3, 2, 1))
        stages, cin = [], base_channels
        for i, n in enumerate(blocks):
            width = base_channels * 2 ** i
            for j in range(n):
                stages.append(block(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.out_channels = cin

    def forward(self, x):
        return self.pool(self.stages(self.stem(x))).flatten(1)


class TSNHead(nn.Layer):
    """Average consensus over segments, dropout, linear classifier initialised N(0, init_std)."""

    def __init__(self, in_channels, num_classes, dropout=0.4, init_std=0.01):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.fc = nn.Linear(in_channels, num_classes,
                            weight_attr=nn.initializer.Normal(0.0, init_std),
                            bias_attr=nn.initializer.Constant(0.0))

    def forward(self, feats, num_segments):
        x = feats.reshape([-1, num_segments, feats.shape[-1]]).mean(axis=1)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


class TSN(nn.Layer):
    """Input [N, T, 3, H, W] -> class logits [N, num_classes] (T segments, or clips x segments)."""

    def __init__(self, backbone: ResNet, head: TSNHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        n, t = x.shape[0], x.shape[1]
        feats = self.backbone(x.reshape([n * t] + list(x.shape[2:])))
        return self.head(feats, t)


def build_model(cfg) -> TSN:
    b, h = cfg.MODEL.backbone, cfg.MODEL.head
    backbone = ResNet(b.depth, b.base_channels)
    model = TSN(backbone, TSNHead(backbone.out_channels, h.num_classes, h.dropout, h.init_std))
    if b.pretrained:
        print(load_pretrained(model, b.pretrained))
    return model


def load_pretrained(model: TSN, path: str) -> str:
    """Initialise from a local file: ImageNet backbone weights (with or without the ``backbone.``
    prefix), a whole TSN checkpoint (``.pdparams`` / ``.pdckpt``), or either saved by PaddleVideo (its
    layer names are translated). Tensors whose shape differs (the classifier of another class count)
    are skipped; returns a one-line report of what was loaded."""
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.backbone.pretrained: {path} does not exist; give a local .pdparams "
                                "file or set it to ''")
    state = paddle.load(path)
    if isinstance(state, dict) and {"model", "optimizer", "meta"} <= set(state):
        state = state["model"]
    unused = []
    from .paddlevideo_names import from_paddlevideo, looks_like_paddlevideo
    if looks_like_paddlevideo(state):
        state, unused = from_paddlevideo(state, model.backbone.depth)
    own = model.state_dict()
    usable, skipped = {}, []
    for key, value in state.items():
        target = key if key in own else f"backbone.{key}" if f"backbone.{key}" in own else None
        if target is None:
            unused.append(key)
        elif list(value.shape) != list(own[target].shape):
            skipped.append(target)
        else:
            usable[target] = value
    import warnings
    with warnings.catch_warnings():  # Paddle warns per absent key; the report below lists them once
        warnings.simplefilter("ignore")
        model.set_state_dict(usable)
    missing = sorted(set(own) - set(usable) - set(skipped))

    def few(keys):
        return f"{keys[:4]}{' ...' if len(keys) > 4 else ''}"
    return (f"pretrained: loaded {len(usable)}/{len(own)} tensors from {path}"
            + (f"; skipped (shape differs) {few(sorted(skipped))}" if skipped else "")
            + (f"; not in the file {few(missing)}" if missing else "")
            + (f"; unused {few(sorted(unused))}" if unused else ""))
