"""Architectures users quantize beyond ``paddle.vision.models``, small: speech (ECAPA-TDNN,
Conformer), sequence (TCN, BiLSTM tagger, TextCNN), vision transformers and mixers (ViT, Swin,
MLP-Mixer, ConvNeXt), detection and segmentation (YOLO-style, UNet, DeepLab ASPP), mobile
CNNs (GhostNet, EfficientNet) and a two-input net, each with the ops that make it what it is
(causal chomps, rolls, relative position tables, GLU, Res2 splits, attentive pooling, ...).
``ZOO`` maps a name to the model class and its inputs (a maker of random batches and the
``InputSpec``)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


class SE1D(nn.Layer):
    """Squeeze-and-excitation over time: a channel gate from the time-averaged input."""

    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv1D(c, c // r, 1)
        self.fc2 = nn.Conv1D(c // r, c, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        w = x.mean(axis=2, keepdim=True)
        return x * F.sigmoid(self.fc2(F.relu(self.fc1(w))))


class TDNNBlock(nn.Layer):
    """ECAPA-TDNN's dilated Conv1D -> ReLU -> BatchNorm1D."""

    def __init__(self, ci, co, k, d):
        super().__init__()
        self.conv = nn.Conv1D(ci, co, k, dilation=d, padding=d * (k - 1) // 2)
        self.bn = nn.BatchNorm1D(co)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2Block1D(nn.Layer):
    """Res2Net's split: each channel group reads the previous group's output added to its own."""

    def __init__(self, c, scale=4, d=2):
        super().__init__()
        self.scale = scale
        w = c // scale
        self.blocks = nn.LayerList([TDNNBlock(w, w, 3, d) for _ in range(scale - 1)])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        xs = paddle.split(x, self.scale, axis=1)
        ys = [xs[0]]
        y = None
        for i, b in enumerate(self.blocks):
            y = b(xs[i + 1] if i == 0 else xs[i + 1] + y)
            ys.append(y)
        return paddle.concat(ys, axis=1)


class SERes2(nn.Layer):
    """ECAPA-TDNN's SE-Res2 block with its residual add."""

    def __init__(self, c, d):
        super().__init__()
        self.t1 = TDNNBlock(c, c, 1, 1)
        self.r2 = Res2Block1D(c, 4, d)
        self.t2 = TDNNBlock(c, c, 1, 1)
        self.se = SE1D(c)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x + self.se(self.t2(self.r2(self.t1(x))))


class ASP(nn.Layer):
    """Attentive statistics pooling: softmax attention over time, weighted mean and std."""

    def __init__(self, c, a=32):
        super().__init__()
        self.tdnn = TDNNBlock(c * 3, a, 1, 1)
        self.conv = nn.Conv1D(a, c, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        mean = x.mean(axis=2, keepdim=True)
        std = paddle.sqrt(x.var(axis=2, keepdim=True) + 1e-5)
        att = paddle.concat([x, mean.expand_as(x), std.expand_as(x)], axis=1)
        att = F.softmax(self.conv(paddle.tanh(self.tdnn(att))), axis=2)
        m = (att * x).sum(axis=2)
        sd = paddle.sqrt(((x**2) * att).sum(axis=2) - m**2 + 1e-5)
        return paddle.concat([m, sd], axis=1)


class ECAPA(nn.Layer):
    """An ECAPA-TDNN-style speaker embedding net on 40 mel bins (input N x 40 x T)."""

    """ECAPA-TDNN-lite speaker embedding (input N x 40 mel x T)."""

    def __init__(self, c=64):
        super().__init__()
        self.l0 = TDNNBlock(40, c, 5, 1)
        self.l1 = SERes2(c, 2)
        self.l2 = SERes2(c, 3)
        self.mfa = TDNNBlock(2 * c, 2 * c, 1, 1)
        self.asp = ASP(2 * c)
        self.bn = nn.BatchNorm1D(4 * c)
        self.fc = nn.Linear(4 * c, 32)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.l0(x)
        a = self.l1(x)
        b = self.l2(a)
        x = self.mfa(paddle.concat([a, b], axis=1))
        return self.fc(self.bn(self.asp(x)))


class TCNBlock(nn.Layer):
    """A temporal block: causal dilated Conv1D (padded, then the right side chomped off)."""

    def __init__(self, ci, co, k, d):
        super().__init__()
        self.p = (k - 1) * d
        self.c1 = nn.Conv1D(ci, co, k, padding=self.p, dilation=d)
        self.c2 = nn.Conv1D(co, co, k, padding=self.p, dilation=d)
        self.down = nn.Conv1D(ci, co, 1) if ci != co else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.c1(x)[:, :, : -self.p])
        y = F.relu(self.c2(y)[:, :, : -self.p])
        return F.relu(y + (x if self.down is None else self.down(x)))


class TCN(nn.Layer):
    """A temporal convolutional network classifying the last step."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(
            TCNBlock(8, 32, 3, 1), TCNBlock(32, 32, 3, 2), TCNBlock(32, 32, 3, 4)
        )
        self.fc = nn.Linear(32, 5)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(self.blocks(x)[:, :, -1])


class ConvNeXtBlock(nn.Layer):
    """7x7 depthwise conv, channels-last LayerNorm and Linear layers, a layer scale."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2D(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = self.create_parameter([c], default_initializer=nn.initializer.Constant(0.5))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.dw(x).transpose([0, 2, 3, 1])
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        y = self.gamma * y
        return x + y.transpose([0, 3, 1, 2])


class LayerNorm2d(nn.Layer):
    """A LayerNorm over the channels of an NCHW tensor, written out (ConvNeXt's)."""

    def __init__(self, c):
        super().__init__()
        self.w = self.create_parameter([c], default_initializer=nn.initializer.Constant(1.0))
        self.b = self.create_parameter([c], is_bias=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        u = x.mean(1, keepdim=True)
        v = ((x - u) ** 2).mean(1, keepdim=True)
        x = (x - u) / paddle.sqrt(v + 1e-6)
        return self.w[:, None, None] * x + self.b[:, None, None]


class ConvNeXtTiny(nn.Layer):
    """A two-stage ConvNeXt-style classifier with a strided 4x4 stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2D(3, 32, 4, stride=4)
        self.ln0 = LayerNorm2d(32)
        self.s1 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.down = nn.Sequential(LayerNorm2d(32), nn.Conv2D(32, 64, 2, stride=2))
        self.s2 = nn.Sequential(ConvNeXtBlock(64))
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.s2(self.down(self.s1(self.ln0(self.stem(x)))))
        return self.head(self.norm(x.mean([2, 3])))


class ViTTiny(nn.Layer):
    """A ViT: patch embedding conv, class token, position embedding, pre-norm encoder."""

    def __init__(self, img=32, p=4, d=64):
        super().__init__()
        self.patch = nn.Conv2D(3, d, p, stride=p)
        n = (img // p) ** 2
        self.cls = self.create_parameter(
            [1, 1, d], default_initializer=nn.initializer.TruncatedNormal(std=0.02)
        )
        self.pos = self.create_parameter(
            [1, n + 1, d], default_initializer=nn.initializer.TruncatedNormal(std=0.02)
        )
        layer = nn.TransformerEncoderLayer(
            d, 4, 2 * d, dropout=0.0, activation="gelu", normalize_before=True
        )
        self.enc = nn.TransformerEncoder(layer, 2)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.patch(x).flatten(2).transpose([0, 2, 1])
        cls = self.cls.expand([x.shape[0], -1, -1])
        x = paddle.concat([cls, x], axis=1) + self.pos
        return self.head(self.norm(self.enc(x))[:, 0])


class WindowAttention(nn.Layer):
    """Swin's window attention with a relative position bias gathered from a table."""

    def __init__(self, d, ws, heads):
        super().__init__()
        self.d, self.ws, self.h = d, ws, heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.table = self.create_parameter(
            [(2 * ws - 1) ** 2, heads], default_initializer=nn.initializer.TruncatedNormal(std=0.02)
        )
        coords = paddle.stack(paddle.meshgrid(paddle.arange(ws), paddle.arange(ws))).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).transpose([1, 2, 0]) + (ws - 1)
        self.register_buffer("index", (rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]).flatten())

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape([B, N, 3, self.h, C // self.h]).transpose([2, 0, 3, 1, 4])
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = paddle.matmul(q * (C // self.h) ** -0.5, k, transpose_y=True)
        bias = (
            paddle.index_select(self.table, self.index).reshape([N, N, self.h]).transpose([2, 0, 1])
        )
        a = F.softmax(a + bias.unsqueeze(0), axis=-1)
        return self.proj(paddle.matmul(a, v).transpose([0, 2, 1, 3]).reshape([B, N, C]))


class SwinBlock(nn.Layer):
    """A Swin block: (shifted) windows partitioned by reshapes, attention, an MLP."""

    def __init__(self, d, res, ws, shift):
        super().__init__()
        self.res, self.ws, self.shift = res, ws, shift
        self.n1 = nn.LayerNorm(d)
        self.attn = WindowAttention(d, ws, 2)
        self.n2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        B, L, C = x.shape
        H = W = self.res
        ws = self.ws
        y = self.n1(x).reshape([B, H, W, C])
        if self.shift:
            y = paddle.roll(y, shifts=(-self.shift, -self.shift), axis=(1, 2))
        y = (
            y.reshape([B, H // ws, ws, W // ws, ws, C])
            .transpose([0, 1, 3, 2, 4, 5])
            .reshape([-1, ws * ws, C])
        )
        y = self.attn(y)
        y = (
            y.reshape([B, H // ws, W // ws, ws, ws, C])
            .transpose([0, 1, 3, 2, 4, 5])
            .reshape([B, H, W, C])
        )
        if self.shift:
            y = paddle.roll(y, shifts=(self.shift, self.shift), axis=(1, 2))
        x = x + y.reshape([B, L, C])
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class SwinTiny(nn.Layer):
    """Two Swin blocks, the second with shifted windows (``paddle.roll``)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2D(3, 32, 4, stride=4)
        self.b1 = SwinBlock(32, 8, 4, 0)
        self.b2 = SwinBlock(32, 8, 4, 2)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.patch(x).flatten(2).transpose([0, 2, 1])
        x = self.b2(self.b1(x))
        return self.head(self.norm(x).mean(1))


def cbr(ci, co, k=3, st=1, act=nn.ReLU):
    return nn.Sequential(
        nn.Conv2D(ci, co, k, stride=st, padding=k // 2, bias_attr=False), nn.BatchNorm2D(co), act()
    )


class UNet(nn.Layer):
    """A two-level UNet: max-pool down, Conv2DTranspose up, skip concats."""

    def __init__(self):
        super().__init__()
        self.e1 = nn.Sequential(cbr(3, 16), cbr(16, 16))
        self.e2 = nn.Sequential(cbr(16, 32), cbr(32, 32))
        self.pool = nn.MaxPool2D(2)
        self.mid = cbr(32, 64)
        self.up2 = nn.Conv2DTranspose(64, 32, 2, stride=2)
        self.d2 = cbr(64, 32)
        self.up1 = nn.Conv2DTranspose(32, 16, 2, stride=2)
        self.d1 = cbr(32, 16)
        self.out = nn.Conv2D(16, 3, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = self.e1(x)
        b = self.e2(self.pool(a))
        m = self.mid(self.pool(b))
        y = self.d2(paddle.concat([self.up2(m), b], 1))
        y = self.d1(paddle.concat([self.up1(y), a], 1))
        return self.out(y)


class DeepLabASPP(nn.Layer):
    """A DeepLabV3-style head: dilated convs, image pooling, bilinear resizes."""

    def __init__(self):
        super().__init__()
        self.back = nn.Sequential(cbr(3, 16, st=2), cbr(16, 32, st=2), cbr(32, 64, st=2))
        self.b0 = cbr(64, 32, 1)
        self.b1 = nn.Sequential(
            nn.Conv2D(64, 32, 3, padding=2, dilation=2), nn.BatchNorm2D(32), nn.ReLU()
        )
        self.b2 = nn.Sequential(
            nn.Conv2D(64, 32, 3, padding=4, dilation=4), nn.BatchNorm2D(32), nn.ReLU()
        )
        self.gp = nn.Sequential(nn.AdaptiveAvgPool2D(1), nn.Conv2D(64, 32, 1), nn.ReLU())
        self.proj = cbr(128, 32, 1)
        self.cls = nn.Conv2D(32, 5, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        f = self.back(x)
        g = F.interpolate(self.gp(f), size=f.shape[2:], mode="bilinear", align_corners=True)
        y = self.cls(self.proj(paddle.concat([self.b0(f), self.b1(f), self.b2(f), g], 1)))
        return F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)


class C3(nn.Layer):
    """YOLOv5's C3 block: two 1x1 branches, a bottleneck with a residual, a concat."""

    def __init__(self, ci, co):
        super().__init__()
        h = co // 2
        self.cv1 = cbr(ci, h, 1, act=nn.Silu)
        self.cv2 = cbr(ci, h, 1, act=nn.Silu)
        self.m = nn.Sequential(cbr(h, h, 1, act=nn.Silu), cbr(h, h, 3, act=nn.Silu))
        self.cv3 = cbr(2 * h, co, 1, act=nn.Silu)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = self.cv1(x)
        return self.cv3(paddle.concat([a + self.m(a), self.cv2(x)], 1))


class SPPF(nn.Layer):
    """YOLOv5's SPPF: three chained 5x5 max-pools concatenated."""

    def __init__(self, c):
        super().__init__()
        self.cv1 = cbr(c, c // 2, 1, act=nn.Silu)
        self.cv2 = cbr(c * 2, c, 1, act=nn.Silu)
        self.m = nn.MaxPool2D(5, 1, 2)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(paddle.concat([x, y1, y2, self.m(y2)], 1))


class YoloLite(nn.Layer):
    """A YOLOv5-style backbone and neck with SiLU, an upsample and two heads."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, 6 - 3, 2, nn.Silu)
        self.d1 = cbr(16, 32, 3, 2, nn.Silu)
        self.c1 = C3(32, 32)
        self.d2 = cbr(32, 64, 3, 2, nn.Silu)
        self.c2 = C3(64, 64)
        self.sppf = SPPF(64)
        self.lat = cbr(64, 32, 1, act=nn.Silu)
        self.c3 = C3(64, 32)
        self.h1 = nn.Conv2D(32, 18, 1)
        self.h2 = nn.Conv2D(64, 18, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        p3 = self.c1(self.d1(self.stem(x)))
        p4 = self.sppf(self.c2(self.d2(p3)))
        u = F.interpolate(self.lat(p4), scale_factor=2, mode="nearest")
        n3 = self.c3(paddle.concat([u, p3], 1))
        return self.h1(n3), self.h2(p4)


class TextCNN(nn.Layer):
    """TextCNN: an embedding read by three Conv2D widths, max over time, a Linear."""

    def __init__(self, vocab=500, emb=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb, padding_idx=0)
        self.convs = nn.LayerList([nn.Conv2D(1, 16, (k, emb)) for k in (2, 3, 4)])
        self.fc = nn.Linear(48, 4)

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        x = self.emb(ids).unsqueeze(1)
        pooled = [F.relu(c(x)).squeeze(3).max(axis=2) for c in self.convs]
        return self.fc(paddle.concat(pooled, 1))


class GhostModule(nn.Layer):
    """GhostNet's module: a primary 1x1 conv and cheap depthwise features, concatenated and sliced."""

    def __init__(self, ci, co, relu=True):
        super().__init__()
        self.co = co
        init = math.ceil(co / 2)
        self.primary = nn.Sequential(
            nn.Conv2D(ci, init, 1, bias_attr=False),
            nn.BatchNorm2D(init),
            nn.ReLU() if relu else nn.Identity(),
        )
        self.cheap = nn.Sequential(
            nn.Conv2D(init, init, 3, padding=1, groups=init, bias_attr=False),
            nn.BatchNorm2D(init),
            nn.ReLU() if relu else nn.Identity(),
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = self.primary(x)
        return paddle.concat([a, self.cheap(a)], 1)[:, : self.co]


class GhostNetLite(nn.Layer):
    """A GhostNet-style classifier with identity and projected shortcuts."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, 3, 2)
        self.g1 = GhostModule(16, 24)
        self.g2 = GhostModule(24, 16, relu=False)
        self.g3 = GhostModule(16, 40)
        self.g4 = GhostModule(40, 24, relu=False)
        self.sc = nn.Sequential(nn.Conv2D(16, 24, 1, bias_attr=False), nn.BatchNorm2D(24))
        self.head = nn.Linear(24, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.stem(x)
        x = x + self.g2(self.g1(x))
        x = self.sc(x) + self.g4(self.g3(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MixerBlock(nn.Layer):
    """An MLP-Mixer block: token mixing on the transposed tokens, then channel mixing."""

    def __init__(self, n, d):
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.t1 = nn.Linear(n, 2 * n)
        self.t2 = nn.Linear(2 * n, n)
        self.n2 = nn.LayerNorm(d)
        self.c1 = nn.Linear(d, 2 * d)
        self.c2 = nn.Linear(2 * d, d)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.n1(x).transpose([0, 2, 1])
        x = x + self.t2(F.gelu(self.t1(y))).transpose([0, 2, 1])
        return x + self.c2(F.gelu(self.c1(self.n2(x))))


class Mixer(nn.Layer):
    """An MLP-Mixer classifier."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2D(3, 48, 4, stride=4)
        self.blocks = nn.Sequential(MixerBlock(64, 48), MixerBlock(64, 48))
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.patch(x).flatten(2).transpose([0, 2, 1])
        return self.head(self.norm(self.blocks(x)).mean(1))


class MBConv(nn.Layer):
    """EfficientNet's MBConv: expansion, depthwise conv, squeeze-excitation, projection."""

    def __init__(self, ci, co, e, st):
        super().__init__()
        h = ci * e
        self.res = st == 1 and ci == co
        self.exp = cbr(ci, h, 1, act=nn.Silu)
        self.dw = nn.Sequential(
            nn.Conv2D(h, h, 3, st, 1, groups=h, bias_attr=False), nn.BatchNorm2D(h), nn.Silu()
        )
        self.se1 = nn.Conv2D(h, max(1, ci // 4), 1)
        self.se2 = nn.Conv2D(max(1, ci // 4), h, 1)
        self.proj = nn.Sequential(nn.Conv2D(h, co, 1, bias_attr=False), nn.BatchNorm2D(co))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.dw(self.exp(x))
        w = F.sigmoid(self.se2(F.silu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        y = self.proj(y * w)
        return x + y if self.res else y


class EffNetLite(nn.Layer):
    """An EfficientNet-style classifier."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, 3, 2, nn.Silu)
        self.b = nn.Sequential(
            MBConv(16, 16, 1, 1), MBConv(16, 24, 4, 2), MBConv(24, 24, 4, 1), MBConv(24, 40, 4, 2)
        )
        self.head = cbr(40, 64, 1, act=nn.Silu)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.head(self.b(self.stem(x))), 1).flatten(1))


class BiLSTMTagger(nn.Layer):
    """A sequence tagger: embedding, 2-layer bidirectional LSTM, Linear per token."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 32)
        self.lstm = nn.LSTM(32, 48, num_layers=2, direction="bidirect")
        self.fc = nn.Linear(96, 7)

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        y, _ = self.lstm(self.emb(ids))
        return self.fc(y)


class ConformerConv(nn.Layer):
    """The Conformer convolution module: pointwise Conv1D + GLU, depthwise Conv1D, BatchNorm."""

    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.pw1 = nn.Conv1D(d, 2 * d, 1)
        self.dw = nn.Conv1D(d, d, 7, padding=3, groups=d)
        self.bn = nn.BatchNorm1D(d)
        self.pw2 = nn.Conv1D(d, d, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = self.ln(x).transpose([0, 2, 1])
        y = F.glu(self.pw1(y), axis=1)
        y = self.pw2(F.silu(self.bn(self.dw(y))))
        return x + y.transpose([0, 2, 1])


class ConformerBlock(nn.Layer):
    """A Conformer block: half-step FFNs around self-attention and the convolution module."""

    def __init__(self, d=64):
        super().__init__()
        self.ff1 = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Silu(), nn.Linear(4 * d, d)
        )
        self.ln_att = nn.LayerNorm(d)
        self.att = nn.MultiHeadAttention(d, 4)
        self.conv = ConformerConv(d)
        self.ff2 = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Silu(), nn.Linear(4 * d, d)
        )
        self.ln = nn.LayerNorm(d)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + 0.5 * self.ff1(x)
        y = self.ln_att(x)
        x = x + self.att(y, y, y)
        x = self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.ln(x)


class Conformer(nn.Layer):
    """A Conformer speech encoder: Conv2D subsampling of fbank features, two blocks."""

    def __init__(self):
        super().__init__()
        self.sub = nn.Sequential(
            nn.Conv2D(1, 16, 3, 2), nn.ReLU(), nn.Conv2D(16, 16, 3, 2), nn.ReLU()
        )
        self.lin = nn.Linear(16 * 9, 64)
        self.blocks = nn.Sequential(ConformerBlock(), ConformerBlock())
        self.out = nn.Linear(64, 30)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:  # x: N x T x 40 fbank
        y = self.sub(x.unsqueeze(1))
        N, C, T, Fq = y.shape
        y = self.lin(y.transpose([0, 2, 1, 3]).reshape([N, T, C * Fq]))
        return self.out(self.blocks(y))


class TwoInput(nn.Layer):
    """Two inputs: an image CNN and a tabular MLP, concatenated."""

    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(
            cbr(3, 16, 3, 2), cbr(16, 32, 3, 2), nn.AdaptiveAvgPool2D(1), nn.Flatten()
        )
        self.tab = nn.Sequential(nn.Linear(12, 32), nn.ReLU())
        self.fc = nn.Linear(64, 3)

    def forward(self, img: paddle.Tensor, feats: paddle.Tensor) -> paddle.Tensor:
        return self.fc(paddle.concat([self.cnn(img), self.tab(feats)], 1))


#: Makes a random batch of ``batch`` inputs from a generator.
Maker = Callable[[np.random.Generator, int], np.ndarray]


def _image(channels: int, height: int, width: int) -> tuple[Maker, paddle.static.InputSpec]:
    return (
        lambda rng, batch: rng.standard_normal((batch, channels, height, width)).astype("float32"),
        paddle.static.InputSpec([None, channels, height, width], "float32"),
    )


def _sequence(*shape: int) -> tuple[Maker, paddle.static.InputSpec]:
    return (
        lambda rng, batch: rng.standard_normal((batch, *shape)).astype("float32"),
        paddle.static.InputSpec([None, *shape], "float32"),
    )


def _tokens(vocabulary: int, length: int) -> tuple[Maker, paddle.static.InputSpec]:
    return (
        lambda rng, batch: rng.integers(1, vocabulary, (batch, length)).astype("int64"),
        paddle.static.InputSpec([None, length], "int64"),
    )


#: name -> (model class, one (batch maker, InputSpec) per input)
ZOO: dict[str, tuple[type, list[tuple[Maker, paddle.static.InputSpec]]]] = {
    "ecapa_tdnn": (ECAPA, [_sequence(40, 50)]),
    "tcn": (TCN, [_sequence(8, 40)]),
    "convnext": (ConvNeXtTiny, [_image(3, 32, 32)]),
    "vit": (ViTTiny, [_image(3, 32, 32)]),
    "swin": (SwinTiny, [_image(3, 32, 32)]),
    "unet": (UNet, [_image(3, 32, 32)]),
    "deeplab_aspp": (DeepLabASPP, [_image(3, 64, 64)]),
    "yolo": (YoloLite, [_image(3, 64, 64)]),
    "textcnn": (TextCNN, [_tokens(500, 24)]),
    "ghostnet": (GhostNetLite, [_image(3, 32, 32)]),
    "mlp_mixer": (Mixer, [_image(3, 32, 32)]),
    "efficientnet": (EffNetLite, [_image(3, 64, 64)]),
    "bilstm_tagger": (BiLSTMTagger, [_tokens(300, 16)]),
    "conformer": (Conformer, [_sequence(40, 40)]),
    "two_inputs": (TwoInput, [_image(3, 32, 32), _sequence(12)]),
}
