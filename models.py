"""Networks of both methods, small parts first.

Content disentanglement (CD): Press et al., "Emerging Disentanglement in Auto-Encoder Based
Unsupervised Image Content Transfer", ICLR 2019, in the IN+ILN / nearest-upsampling variant of
kozistr/improved-ContentDisentanglement. A common encoder and a separate encoder feed one decoder;
a spectral-norm discriminator on the common code pushes the attribute into the separate code.

OverLORD: Gabbay & Hoshen, "Scaling-up Disentanglement for Image Translation", ICCV 2021. Label
and per-image codes drive a StyleGAN2 synthesis network (Karras et al., CVPR 2020) without mapping
net or noise, written here in plain PyTorch; encoders later amortise the codes and a StyleGAN2
discriminator tunes the result. A frozen VGG16 gives the perceptual distance.

Reconstruction distances of both methods: pixel L1, GLO's Laplacian-pyramid L1 (Bojanowski et
al., "Optimizing the Latent Space of Generative Networks", ICML 2018) and the VGG16 distance.

CD's mask option (--mask): Mokady et al., "Mask Based Unsupervised Content Transfer", ICLR 2020,
on this project's architecture: a second decoder of the same design predicts a mask and the
content inside it, and the target's own pixels are kept outside.
"""
import functools
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from utils import UserError


# ------------------------------------------------------------------------------------------------
# CD primitives

def lrelu():
    """The leaky ReLU (slope 0.2) used throughout the CD networks."""
    return nn.LeakyReLU(0.2, inplace=True)


class ILN(nn.Module):
    """Instance-layer norm (U-GAT-IT): a learned blend rho of instance and layer statistics."""

    def __init__(self, channels, eps=1.1e-5):
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        # Both normalisations are per-(sample, channel) affine maps of x, so they fold into one
        # scale and shift: a single pass over x instead of two normalised copies. The layer
        # statistics come from the instance ones; variances are unbiased, as the original's.
        # The statistics are fp32 whatever x is: under fp16 autocast (n_pixels - 1) * var_in
        # overflows at 256 px once a channel's variance passes about 1.
        n_pixels = x.shape[2] * x.shape[3]
        var_in, mean_in = torch.var_mean(x.float(), (2, 3), correction=1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        squares_ln = ((n_pixels - 1) * var_in + n_pixels * (mean_in - mean_ln).square())
        var_ln = squares_ln.sum(1, keepdim=True) / (x.shape[1] * n_pixels - 1)
        a_in = self.rho * torch.rsqrt(var_in + self.eps)
        a_ln = (1 - self.rho) * torch.rsqrt(var_ln + self.eps)
        scale = self.gamma * (a_in + a_ln)
        shift = self.beta - self.gamma * (a_in * mean_in + a_ln * mean_ln)
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))

    def extra_repr(self):
        return f"{self.rho.shape[1]}, eps={self.eps}"


def conv_in_lrelu(c_in, c_out, kernel, stride=1):
    """Reflection pad -> bias-free conv -> InstanceNorm -> LReLU (the encoders' building unit)."""
    return nn.Sequential(nn.ReflectionPad2d(kernel // 2),
                         nn.Conv2d(c_in, c_out, kernel, stride, bias=False),
                         nn.InstanceNorm2d(c_out), lrelu())


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convs with InstanceNorm; no activation after the sum."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False),
            nn.InstanceNorm2d(channels), lrelu(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False),
            nn.InstanceNorm2d(channels))

    def forward(self, x):
        return x + self.body(x)


SUBPIXEL_MIN_SIDE = 8  # below this input side the folded conv's extra border row costs more


def fold_taps(weight, dim):
    """A 3-tap kernel along `dim` -> the 2-tap kernels of the even and odd output phases of
    'nearest x2, then the 3-tap conv' (each phase sees only two distinct input pixels)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def replicate_pad1(x):
    """x with its outer rows and columns repeated once: F.pad's 'replicate' by 1, written with
    cat because that pad's backward trips torch.compile (strides of its fake kernel)."""
    x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], 2)
    return torch.cat([x[..., :1], x, x[..., -1:]], 3)


def upsample_conv3x3(x, weight):
    """conv3x3(reflect_pad1(nearest_x2(x)), weight), computed at x's resolution.

    The 3x3 kernel folds into four 2x2 kernels, one per output phase, which run on x itself:
    4/9 of the multiply-adds and no upsampled copy. Reflect-padding the upsampled image is
    replicate-padding x. Same values as the direct form up to float rounding (tested)."""
    n, _, h, w = x.shape
    out_channels = weight.shape[0]
    kernels = [k for rows in fold_taps(weight, 2) for k in fold_taps(rows, 3)]
    y = F.conv2d(replicate_pad1(x), torch.cat(kernels))
    y = y.unflatten(1, (2, 2, out_channels))  # (N, row phase, column phase, O, h+1, w+1)
    rows = [torch.stack([y[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)], -1) for a in (0, 1)]
    return torch.stack(rows, 3).reshape(n, out_channels, 2 * h, 2 * w)


class UpSampleBlock(nn.Module):
    """Nearest x2 -> reflection-padded 3x3 conv halving the channels -> ILN -> LReLU."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                  nn.ReflectionPad2d(1),
                                  nn.Conv2d(channels, channels // 2, 3, bias=False),
                                  ILN(channels // 2), lrelu())

    def forward(self, x):
        upsample, pad, conv, norm, act = self.body
        if min(x.shape[2:]) >= SUBPIXEL_MIN_SIDE:
            x = upsample_conv3x3(x, conv.weight)
        else:
            x = conv(pad(upsample(x)))
        return act(norm(x))


# ------------------------------------------------------------------------------------------------
# CD networks

class Encoder(nn.Module):
    """Stem 7x7, n_down stride-2 convs doubling the width, a last stride-2 conv to `out_channels`,
    then residual blocks. Serves as both the common (E1) and the separate (E2) encoder."""

    def __init__(self, out_channels, base_width=32, n_down=3, n_res_blocks=6):
        super().__init__()
        layers = [conv_in_lrelu(3, base_width, 7)]
        width = base_width
        for _ in range(n_down):
            layers.append(conv_in_lrelu(width, width * 2, 3, stride=2))
            width *= 2
        layers.append(conv_in_lrelu(width, out_channels, 3, stride=2))
        layers += [ResidualBlock(out_channels) for _ in range(n_res_blocks)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)  # (N, out_channels, R / 2^(n_down+1), same)


def decoder_layers(code_channels, n_up, n_res_blocks, out_channels):
    """Residual blocks on the code, n_up nearest-neighbour upsamplings, 7x7 conv to
    `out_channels` (no activation): the trunk shared by Decoder and MaskDecoder."""
    layers = [ResidualBlock(code_channels) for _ in range(n_res_blocks)]
    width = code_channels
    for _ in range(n_up):
        layers.append(UpSampleBlock(width))
        width //= 2
    return layers + [nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7, bias=False)]


class Decoder(nn.Module):
    """Residual blocks on the code, n_up nearest-neighbour upsamplings, 7x7 conv to RGB, tanh."""

    def __init__(self, code_channels=512, n_up=4, n_res_blocks=3):
        super().__init__()
        self.net = nn.Sequential(*decoder_layers(code_channels, n_up, n_res_blocks, 3), nn.Tanh())

    def forward(self, code):
        return self.net(code)  # (N, 3, R, R) in [-1, 1]


def composite(mask, content, base):
    """mask * content + (1 - mask) * base: the content inside the mask, the base elsewhere
    (exactly the base where the mask is 0). mask (N, 1, R, R) broadcasts over the channels."""
    return mask * content + (1 - mask) * base


class MaskDecoder(nn.Module):
    """The Decoder's design with a 4-channel last conv (Mokady et al., ICLR 2020, D_B): channel 0
    is the mask m = sigmoid, channels 1-3 the content y = tanh, to be composited onto a base."""

    def __init__(self, code_channels=512, n_up=4, n_res_blocks=3):
        super().__init__()
        self.net = nn.Sequential(*decoder_layers(code_channels, n_up, n_res_blocks, 4))

    def forward(self, code):
        h = self.net(code)
        return torch.sigmoid(h[:, :1]), torch.tanh(h[:, 1:])  # m (N, 1, R, R), y (N, 3, R, R)


class LatentDiscriminator(nn.Module):
    """Spectral-norm MLP on the flattened common code; returns one logit per image (A = 1)."""

    def __init__(self, in_features, hidden=512):
        super().__init__()
        self.net = nn.Sequential(spectral_norm(nn.Linear(in_features, hidden)), lrelu(),
                                 spectral_norm(nn.Linear(hidden, 1)))

    def forward(self, common):
        return self.net(common.flatten(1)).squeeze(1)  # (N,)


@dataclass(frozen=True)
class CDConfig:
    """Architecture of the CD model; the defaults are kozistr's (256 px, 512-channel code)."""
    resize: int = 256             # image side R
    sep: int = 128                # separate-code channels S
    n_tot_feats: int = 512        # code channels T = common (T - S) + separate (S)
    n_blocks: int = 3             # encoder stride-2 blocks before the last; decoder: n_blocks+1 ups
    n_res_blocks: int = 3         # decoder residual blocks
    n_enc_res_blocks: int = 6     # residual blocks of each encoder
    e2_feats: int = 32            # separate encoder base width (kozistr's train.py used 512)
    mask: bool = False            # add the mask decoder D_B of Mokady et al. (train.py --mask)

    @property
    def latent_side(self):
        return self.resize // 2 ** (self.n_blocks + 1)

    @property
    def e1_feats(self):
        return self.n_tot_feats // 2 ** (self.n_blocks + 1)

    @classmethod
    def from_dict(cls, cfg):
        """Take the architecture fields out of a larger config dict."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})

    def to_dict(self):
        return asdict(self)

    def validate(self):
        """Raise UserError for a combination of sizes the networks cannot be built with."""
        scale = 2 ** (self.n_blocks + 1)
        if self.n_blocks < 0 or self.n_res_blocks < 0 or self.n_enc_res_blocks < 0:
            raise UserError("--n_blocks, --n_res_blocks and --n_enc_res_blocks must be >= 0")
        if self.resize <= 0 or self.resize % scale:
            raise UserError(f"--resize {self.resize} must be a positive multiple of 2**(n_blocks+1)"
                            f" = {scale} (n_blocks={self.n_blocks})")
        if self.n_tot_feats % scale:
            raise UserError(f"--n_tot_feats {self.n_tot_feats} must be divisible by 2**(n_blocks+1)"
                            f" = {scale}")
        if not 0 < self.sep < self.n_tot_feats:
            raise UserError(f"--sep {self.sep} must be between 1 and the code width "
                            f"--n_tot_feats {self.n_tot_feats} minus 1")
        if self.e2_feats <= 0:
            raise UserError("--e2_feats must be positive")


class CDModel(nn.Module):
    """Common and separate encoders, decoder and latent discriminator, with the codes' algebra."""

    def __init__(self, cfg: CDConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        common_channels = cfg.n_tot_feats - cfg.sep
        self.common_encoder = Encoder(common_channels, cfg.e1_feats, cfg.n_blocks,
                                      cfg.n_enc_res_blocks)
        self.separate_encoder = Encoder(cfg.sep, cfg.e2_feats, cfg.n_blocks, cfg.n_enc_res_blocks)
        self.decoder = Decoder(cfg.n_tot_feats, cfg.n_blocks + 1, cfg.n_res_blocks)
        self.latent_disc = LatentDiscriminator(common_channels * cfg.latent_side ** 2,
                                               cfg.n_tot_feats)
        if cfg.mask:  # built last, so the other networks start as those of a plain model
            self.mask_decoder = MaskDecoder(cfg.n_tot_feats, cfg.n_blocks + 1, cfg.n_res_blocks)

    def autoencoder_networks(self):
        """The encoders and decoders (the mask model's D_B too)."""
        nets = [self.common_encoder, self.separate_encoder, self.decoder]
        return nets + [self.mask_decoder] if self.cfg.mask else nets

    def autoencoder_parameters(self):
        """Parameters of the encoders and decoders (one optimiser in the originals)."""
        return [p for m in self.autoencoder_networks() for p in m.parameters()]

    def zero_separate(self, common):
        """The separate code of a B image: zeros shaped like E2's output."""
        return common.new_zeros(common.shape[0], self.cfg.sep, *common.shape[2:])

    def decode(self, common, separate=None):
        """Image from [common, separate]; separate=None means the zero code (no attribute)."""
        if separate is None:
            separate = self.zero_separate(common)
        return self.decoder(torch.cat([common, separate], 1))

    def add(self, common, separate, base):
        """The image of [common, separate] with the attribute: decoded whole, or (mask model)
        D_B's content composited onto `base`, the image whose common code this is."""
        if self.cfg.mask:
            return composite(*self.mask_decoder(torch.cat([common, separate], 1)), base)
        return self.decode(common, separate)

    def reconstruct(self, common, separate):
        """The image from its codes alone: decoded whole, or (mask model) D_B's content over
        D_A's render of [common, 0], as the Recon1 term trains it."""
        if self.cfg.mask:
            return self.add(common, separate, self.decode(common))
        return self.decode(common, separate)

    def mask_of(self, common, separate):
        """D_B's mask (N, 1, R, R) of [common, separate] (mask model only)."""
        return self.mask_decoder(torch.cat([common, separate], 1))[0]

    def transfer(self, x_target, x_reference):
        """The attribute of `x_reference` (A images) put on `x_target` (mask model: only inside
        the mask, the target's pixels elsewhere)."""
        return self.add(self.common_encoder(x_target), self.separate_encoder(x_reference),
                        x_target)

    def remove(self, x):
        """`x` without the attribute: its common code with a zero separate code."""
        return self.decode(self.common_encoder(x))

    @torch.no_grad()
    def clamp_rho(self):
        """Keep every ILN blend weight in [0, 1] (done after each training step)."""
        for net in self.autoencoder_networks()[2:]:
            for m in net.modules():
                if isinstance(m, ILN):
                    m.rho.clamp_(0.0, 1.0)


def build_cd(cfg):
    """CDModel from a config dict (train flags or a checkpoint's stored config); with the seed's
    layer arithmetic under --reproduce kozistr."""
    model = CDModel(CDConfig.from_dict(cfg))
    return use_seed_arithmetic(model) if cfg.get("reproduce") == "kozistr" else model


def seed_iln(norm, x):
    """ILN as the seeds compute it: two normalised copies of x, blended by rho."""
    inst = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(x.var((2, 3), keepdim=True) + norm.eps)
    layer = (x - x.mean((1, 2, 3), keepdim=True)) / torch.sqrt(x.var((1, 2, 3), keepdim=True)
                                                               + norm.eps)
    return (norm.rho * inst + (1 - norm.rho) * layer) * norm.gamma + norm.beta


def seed_upsample_block(block, x):
    """UpSampleBlock as the seeds compute it: upsample, pad, then the 3x3 conv at full size."""
    upsample, pad, conv, norm, act = block.body
    return act(norm(conv(pad(upsample(x)))))


def use_seed_arithmetic(model):
    """Swap the folded ILN and upsampling conv of `model` for the seeds' direct forms (same
    function and weights, more work), as kozistr's code computes it
    (--reproduce kozistr, and bench.py's seed-loop row)."""
    for m in model.modules():
        if isinstance(m, ILN):
            m.forward = functools.partial(seed_iln, m)
        elif isinstance(m, UpSampleBlock):
            m.forward = functools.partial(seed_upsample_block, m)
    return model


# ------------------------------------------------------------------------------------------------
# StyleGAN2 primitives (SPEC C): FIR resampling, equalised layers, modulated convolution

BLUR_KERNEL = (1, 3, 3, 1)


def stylegan_channels(res: int, channel_multiplier: int = 2,
                      max_width: Optional[int] = None) -> int:
    """Width of the StyleGAN2 layers at resolution `res`, optionally capped at `max_width`."""
    if res < 4 or res > 1024 or res & (res - 1):
        raise ValueError(f"resolution must be a power of two from 4 to 1024, got {res}")
    # 4..32 -> 512; from 64 on the width halves with each doubling: 64 -> 256·m, ..., 1024 -> 16·m
    width = 512 if res <= 32 else (2 ** 14 // res) * channel_multiplier
    return width if max_width is None else min(width, max_width)


def make_blur_kernel(k1: Sequence[float] = BLUR_KERNEL) -> torch.Tensor:
    """Separable 2-D FIR kernel outer(k1, k1), normalised to sum to 1."""
    k = torch.tensor(k1, dtype=torch.float32)
    k = torch.outer(k, k)
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel, up: int = 1, down: int = 1,
              pad: Sequence[int] = (0, 0)) -> torch.Tensor:
    """Zero-insert by `up`, pad (negative crops), convolve with `kernel`, keep every `down`-th.

    `kernel` is a 2-D tensor, or a sequence of floats for a separable kernel outer(k, k): that
    path sums shifted slices, which is much cheaper to differentiate (twice, for R1) on CPU."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))  # up-1 zeros after each sample
        x = x.reshape(n, c, h * up, w * up)
    p0, p1 = pad
    x = F.pad(x, (p0, p1, p0, p1))
    if isinstance(kernel, torch.Tensor):
        # conv2d correlates, so flip the kernel for a true convolution; every channel alike
        weight = kernel.flip((0, 1))[None, None].to(x)  # (1, 1, kh, kw)
        hh, ww = x.shape[-2:]
        x = F.conv2d(x.reshape(n * c, 1, hh, ww), weight, stride=down)
        return x.reshape(n, c, x.shape[-2], x.shape[-1])
    taps = tuple(reversed(kernel))  # flipped: a true convolution
    size = len(taps)
    out_h, out_w = x.shape[-2] - size + 1, x.shape[-1] - size + 1
    x = sum(t * x[..., :, i:i + out_w] for i, t in enumerate(taps))   # along the width
    x = sum(t * x[..., i:i + out_h, :] for i, t in enumerate(taps))   # along the height
    return x[..., ::down, ::down] if down > 1 else x


def separable_taps(k1: Sequence[float], gain: float = 1.0) -> tuple:
    """1-D taps whose outer product is make_blur_kernel(k1) * gain**2."""
    total = float(sum(k1))
    return tuple(float(v) * gain / total for v in k1)


class Blur(nn.Module):
    """FIR low-pass filter with fixed padding, used around strided and transposed convolutions."""

    def __init__(self, pad: Sequence[int], k1: Sequence[float] = BLUR_KERNEL,
                 upsample_factor: int = 1):
        super().__init__()
        self.pad = tuple(pad)
        # after zero insertion only 1/factor² of the samples are non-zero: gain restores the mean
        kernel = make_blur_kernel(k1) * upsample_factor ** 2
        self.register_buffer("kernel", kernel, persistent=False)
        self.taps = separable_taps(k1, upsample_factor)

    def forward(self, x):
        return upfirdn2d(x, self.taps, pad=self.pad)

    def extra_repr(self):
        return f"pad={self.pad}, kernel_size={self.kernel.shape[0]}"


class Upsample(nn.Module):
    """×2 FIR upsampling (zero insertion + blur), used on the RGB skip path."""

    def __init__(self, k1: Sequence[float] = BLUR_KERNEL, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_blur_kernel(k1) * factor ** 2, persistent=False)
        self.taps = separable_taps(k1, factor)
        p = len(k1) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)  # (2, 1) for k1 of length 4

    def forward(self, x):
        return upfirdn2d(x, self.taps, up=self.factor, pad=self.pad)  # (N, C, 2H, 2W)

    def extra_repr(self):
        return f"factor={self.factor}, pad={self.pad}"


def fused_leaky_relu(x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     negative_slope: float = 0.2, scale: float = math.sqrt(2)) -> torch.Tensor:
    """leaky_relu(x + bias) · scale, with a per-channel bias broadcast over every dim after 1."""
    if bias is not None:
        x = x + bias.reshape(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Per-channel bias, then leaky ReLU (slope 0.2) scaled by √2 to keep the variance."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.channels = channels
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x):
        return fused_leaky_relu(x, self.bias)

    def extra_repr(self):
        return f"{self.channels}, bias={self.bias is not None}"


class EqualConv2d(nn.Module):
    """Conv2d with equalised learning rate: N(0, 1) weights rescaled by 1/√fan_in at run time."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)

    def extra_repr(self):
        out_c, in_c, k, _ = self.weight.shape
        return (f"{in_c}, {out_c}, kernel_size={k}, stride={self.stride}, padding={self.padding}, "
                f"bias={self.bias is not None}")


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate; `activate` adds a fused leaky ReLU on its bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_features)
        self.lr_mul, self.activate = lr_mul, activate

    def forward(self, x):
        bias = None if self.bias is None else self.bias * self.lr_mul
        if self.activate:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias)

    def extra_repr(self):
        out_f, in_f = self.weight.shape
        return (f"{in_f}, {out_f}, bias={self.bias is not None}, lr_mul={self.lr_mul}, "
                f"activate={self.activate}")


class ModulatedConv2d(nn.Module):
    """StyleGAN2 convolution whose weights are scaled per sample by a style, then demodulated."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False,
                 k1: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.demodulate, self.upsample = demodulate, upsample
        self.weight = nn.Parameter(
            torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size ** 2)
        # starts at 1 so that a fresh layer sees unmodulated weights
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)
        if upsample:
            p = (len(k1) - 2) - (kernel_size - 1)
            self.blur = Blur(((p + 1) // 2 + 1, p // 2 + 1), k1, upsample_factor=2)

    def sample_weights(self, style: torch.Tensor) -> torch.Tensor:
        """Modulated (and demodulated) weights of every sample, (N, out, in, k, k)."""
        s = self.modulation(style)  # (N, in)
        w = self.scale * self.weight * s[:, None, :, None, None]  # (N, out, in, k, k)
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum((2, 3, 4), keepdim=True) + 1e-8)
        return w

    def forward(self, x, style):
        n, _, h, w = x.shape
        weight = self.sample_weights(style)
        k = self.kernel_size
        # the batch becomes the group axis, so one grouped conv applies each sample's own weights
        x = x.reshape(1, n * self.in_channels, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(n * self.in_channels, self.out_channels, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, groups=n)  # (1, N·out, 2H+k-2, 2W+k-2)
            out = out.reshape(n, self.out_channels, out.shape[-2], out.shape[-1])
            return self.blur(out)  # (N, out, 2H, 2W)
        weight = weight.reshape(n * self.out_channels, self.in_channels, k, k)
        out = F.conv2d(x, weight, padding=k // 2, groups=n)
        return out.reshape(n, self.out_channels, h, w)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"style_dim={self.modulation.weight.shape[1]}, demodulate={self.demodulate}, "
                f"upsample={self.upsample}")


class StyledConv(nn.Module):
    """Modulated conv + bias + scaled leaky ReLU; OverLORD drops StyleGAN2's noise injection."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, k1: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim,
                                    upsample=upsample, k1=k1)
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x, style):
        return self.activate(self.conv(x, style))


class ToRGB(nn.Module):
    """1×1 modulated conv to RGB (no demodulation), plus the upsampled RGB of the level below."""

    def __init__(self, in_channels: int, style_dim: int, upsample: bool = True,
                 k1: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.upsample = Upsample(k1) if upsample else None
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias  # (N, 3, H, W)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConstantInput(nn.Module):
    """Learned C×size×size tensor that starts the synthesis, repeated over the batch."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch_size: int):
        return self.input.expand(batch_size, -1, -1, -1)

    def extra_repr(self):
        return f"{self.input.shape[1]}, size={self.input.shape[2]}"


class ConvLayer(nn.Sequential):
    """Discriminator conv: [blur, stride 2] equalised conv, then optional bias + scaled LReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 downsample: bool = False, bias: bool = True, activate: bool = True,
                 k1: Sequence[float] = BLUR_KERNEL):
        layers = []
        if downsample:
            p = (len(k1) - 2) + (kernel_size - 1)
            layers.append(Blur(((p + 1) // 2, p // 2), k1))  # H -> H+1 (k=3) or H-1 (k=1)
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride, padding,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channels, bias=bias))
        super().__init__(*layers)


class DiscResBlock(nn.Module):
    """Discriminator residual block that halves the resolution: (convs + 1×1 skip) / √2."""

    def __init__(self, in_channels: int, out_channels: int, k1: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3, k1=k1)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True, k1=k1)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, bias=False,
                              activate=False, k1=k1)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)  # (N, out, H/2, W/2)


class MinibatchStdDev(nn.Module):
    """Appends one channel: the feature std across a group of samples, averaged to a scalar."""

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x):
        n, c, h, w = x.shape
        group = min(n, self.group_size)
        if n % group:
            raise ValueError(f"minibatch stddev needs a batch size divisible by {group}, got {n}")
        # sample g·(N/G) + m belongs to group m
        y = x.reshape(group, n // group, c, h, w)
        y = torch.sqrt(y.var(0, unbiased=False) + 1e-8)  # (N/G, C, H, W)
        y = y.mean((1, 2, 3)).reshape(-1, 1, 1, 1)  # (N/G, 1, 1, 1)
        y = y.repeat(group, 1, h, w)  # (N, 1, H, W)
        return torch.cat([x, y], 1)  # (N, C+1, H, W)

    def extra_repr(self):
        return f"group_size={self.group_size}"


# ------------------------------------------------------------------------------------------------
# OverLORD networks (SPEC B3)

def _log2_size(img_size: int) -> int:
    """log2 of a power-of-two image side ≥ 8, else a ValueError."""
    if img_size < 8 or img_size & (img_size - 1):
        raise ValueError(f"image side must be a power of two ≥ 8, got {img_size}")
    return int(math.log2(img_size))


class Generator(nn.Module):
    """StyleGAN2 synthesis network without mapping net or noise; one latent styles every layer."""

    def __init__(self, img_size: int, latent_dim: int, channel_multiplier: int = 2,
                 max_width: Optional[int] = None):
        super().__init__()
        self.img_size, self.latent_dim = img_size, latent_dim
        log_size = _log2_size(img_size)
        ch = {2 ** i: stylegan_channels(2 ** i, channel_multiplier, max_width)
              for i in range(2, log_size + 1)}  # resolution -> width

        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, latent_dim)
        self.to_rgb1 = ToRGB(ch[4], latent_dim, upsample=False)
        self.up_convs, self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for res in (2 ** i for i in range(3, log_size + 1)):  # 8 ... img_size
            self.up_convs.append(StyledConv(ch[res // 2], ch[res], 3, latent_dim, upsample=True))
            self.convs.append(StyledConv(ch[res], ch[res], 3, latent_dim))
            self.to_rgbs.append(ToRGB(ch[res], latent_dim))

    def forward(self, latent):
        """(N, latent_dim) codes -> (N, 3, S, S) images, unbounded (targets are in [0, 1])."""
        x = self.input(latent.shape[0])  # (N, C4, 4, 4)
        x = self.conv1(x, latent)
        rgb = self.to_rgb1(x, latent)  # (N, 3, 4, 4)
        for up_conv, conv, to_rgb in zip(self.up_convs, self.convs, self.to_rgbs):
            x = conv(up_conv(x, latent), latent)  # (N, C, 2H, 2W)
            rgb = to_rgb(x, latent, rgb)  # (N, 3, 2H, 2W)
        return rgb


class EncoderResBlock(nn.Module):
    """Pre-activation residual block that halves the resolution; no normalisation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Sequential(
            nn.LeakyReLU(0.2), nn.Conv2d(in_channels, in_channels, 3, 1, 1), nn.AvgPool2d(2),
            nn.LeakyReLU(0.2), nn.Conv2d(in_channels, out_channels, 3, 1, 1))
        # a learned 1×1 projection only where the width changes
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, bias=False)
                         if in_channels != out_channels else nn.Identity())

    def forward(self, x):
        shortcut = F.avg_pool2d(self.shortcut(x), 2)
        return (shortcut + self.residual(x)) / math.sqrt(2)  # (N, out, H/2, W/2)


class CodeEncoder(nn.Module):
    """Plain conv encoder from an image to a code vector (label, uncorrelated or correlated)."""

    def __init__(self, img_size: int, code_dim: int, base: int = 64, max_width: int = 256):
        super().__init__()
        self.img_size, self.code_dim = img_size, code_dim
        layers = [nn.Conv2d(3, base, 3, 1, 1)]
        width = base
        for _ in range(_log2_size(img_size) - 2):  # down to 4×4
            layers.append(EncoderResBlock(width, min(2 * width, max_width)))
            width = min(2 * width, max_width)
        layers += [nn.LeakyReLU(0.2), nn.Conv2d(width, width, 4, 1, 0),  # (N, width, 1, 1)
                   nn.LeakyReLU(0.2), nn.Conv2d(width, code_dim, 1, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, img):
        return self.net(img).flatten(1)  # (N, code_dim)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator; returns one real/fake logit per image, (N, 1)."""

    def __init__(self, img_size: int, channel_multiplier: int = 2, max_width: Optional[int] = None,
                 stddev_group: int = 4):
        super().__init__()
        self.img_size = img_size
        log_size = _log2_size(img_size)
        ch = {2 ** i: stylegan_channels(2 ** i, channel_multiplier, max_width)
              for i in range(2, log_size + 1)}  # resolution -> width

        blocks = [ConvLayer(3, ch[img_size], 1)]
        for res in (2 ** i for i in range(log_size, 2, -1)):  # img_size ... 8, each block halves it
            blocks.append(DiscResBlock(ch[res], ch[res // 2]))
        self.blocks = nn.Sequential(*blocks)
        self.stddev = MinibatchStdDev(stddev_group)
        self.final_conv = ConvLayer(ch[4] + 1, ch[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(ch[4] * 4 * 4, ch[4], activate=True), EqualLinear(ch[4], 1))

    def forward(self, img):
        x = self.stddev(self.blocks(img))  # (N, C4 + 1, 4, 4)
        x = self.final_conv(x).flatten(1)  # (N, C4·16)
        return self.final_linear(x)  # (N, 1)


# ------------------------------------------------------------------------------------------------
# Perceptual distance: frozen VGG16 features, loaded only from local files (SPEC B3, B8)

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 checkpoint name
VGG_MIN_SIDE = 32  # VGG16's five poolings need images at least this large
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features() -> nn.Sequential:
    """Random-init VGG16 features with torchvision's layout, indices and state-dict keys."""
    layers, in_channels = [], 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def find_vgg_weights(path: Optional[str] = None) -> Optional[str]:
    """`path` if it is a file, else the torch hub cache copy of the VGG16 weights, else None."""
    if path:
        return str(path) if os.path.isfile(path) else None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_WEIGHTS_FILE)
    return cached if os.path.isfile(cached) else None


def load_vgg16_features(path: str) -> nn.Sequential:
    """VGG16 features loaded from a local torchvision state dict (full model or features only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in state.items()
                if not k.startswith("classifier.")}
    net = vgg16_features()
    try:
        net.load_state_dict(features)
    except RuntimeError as e:
        raise RuntimeError(f"{path} is not a torchvision VGG16 state dict: {e}") from None
    return net


class VGGDistance(nn.Module):
    """Pixel L1 plus L1 between frozen VGG16 activations, averaged over the batch (OverLORD)."""

    def __init__(self, layer_ids: Sequence[int] = (2, 7, 12, 21, 30), normalize: bool = True,
                 weights: Union[str, os.PathLike, None] = None):
        super().__init__()
        self.layer_ids, self.normalize = tuple(layer_ids), normalize
        if weights == "random":  # for tests only: no ImageNet knowledge at all
            self.source, features = "random", vgg16_features()
        else:
            path = find_vgg_weights(weights)
            if path is None:
                where = (f"the file {weights}" if weights else
                         f"{VGG16_WEIGHTS_FILE} in {torch.hub.get_dir()}/checkpoints/")
                raise FileNotFoundError(
                    f"VGG16 ImageNet weights not found ({where}); nothing is downloaded. Pass the "
                    f"path of {VGG16_WEIGHTS_FILE}, or copy it into the torch hub cache "
                    f"({torch.hub.get_dir()}/checkpoints/).")
            self.source, features = path, load_vgg16_features(path)
        if not all(0 <= i < len(features) for i in self.layer_ids):
            raise ValueError(f"layer ids must lie in 0..{len(features) - 1}, got {self.layer_ids}")
        # The seed keeps conv outputs that torchvision's in-place ReLU then overwrites, so its
        # features are post-ReLU: id 2 reads relu1_2, ..., 21 reads relu4_3 (30 is pool5 anyway).
        self.capture_ids = tuple(
            i + 1 if isinstance(features[i], nn.Conv2d) and i + 1 < len(features)
            and isinstance(features[i + 1], nn.ReLU) else i for i in self.layer_ids)
        self.features = features[:max(self.capture_ids) + 1]  # later layers are never used
        self.features.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1),
                             persistent=False)
        self.train(False)

    def train(self, mode: bool = True):
        """Frozen network: stays in eval mode whatever mode its parent is put in."""
        return super().train(False)

    def activations(self, x: torch.Tensor) -> list:
        """VGG16 activations of x at `capture_ids`, one (N, C_k, H_k, W_k) tensor per id."""
        if self.normalize:
            x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.capture_ids:
                out.append(x)
        return out

    def forward(self, a, b):
        n = a.shape[0]
        loss = (a - b).abs().flatten(1).mean(1)  # (N,)
        # one pass over both batches; VGG treats samples independently
        for fa, fb in (f.split(n) for f in self.activations(torch.cat([a, b]))):
            loss = loss + (fa - fb).abs().flatten(1).mean(1)
        return loss.mean()

    def extra_repr(self):
        return (f"layer_ids={self.layer_ids}, capture_ids={self.capture_ids}, "
                f"normalize={self.normalize}, weights={self.source!r}")


class L1Distance(nn.Module):
    """Mean absolute pixel difference; the offline fallback for VGGDistance, of lower quality."""

    def forward(self, a, b):
        return (a - b).abs().flatten(1).mean(1).mean()


BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)  # the Gaussian-like blur of Burt & Adelson's pyramid
LAPLACIAN_MIN_SIDE = 4                 # the low-pass residual is kept at no less than this side


class Lap1Distance(nn.Module):
    """Laplacian-pyramid L1 of GLO (Bojanowski, Joulin, Lopez-Paz & Szlam, "Optimizing the Latent
    Space of Generative Networks", ICML 2018), the loss GLO optimised its latents with:
        Lap1(x, x') = sum_j 2^(-2j) |L^j(x) - L^j(x')|_1,
    L^j the j-th level of the Laplacian pyramid. Counting j in octaves up from the coarsest
    level, 2^(-2j) is the inverse of level j's pixel count relative to it: every level counts
    alike per pixel (the reading of the paper's public re-implementations, which add up each
    level's mean). So here the loss is the sum over levels of the mean absolute band difference
    (identical images give 0; a constant offset c gives |c|, all of it in the low-pass residual).
    Bands are x minus the blurred, decimated and re-enlarged x; the last level is the residual.
    Computed in float32 whatever autocast is active: the bands are small differences."""

    def __init__(self, max_levels: Optional[int] = None):
        super().__init__()
        self.max_levels = max_levels  # band-pass levels; None = until the residual is small
        taps = torch.tensor(BINOMIAL_5)
        self.register_buffer("kernel", (taps[:, None] * taps[None, :] / taps.sum() ** 2)
                             .reshape(1, 1, 5, 5), persistent=False)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """5x5 binomial blur of every channel, reflect-padded (keeps the side)."""
        c = x.shape[1]
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.kernel.expand(c, 1, 5, 5),
                        groups=c)

    def pyramid(self, x: torch.Tensor) -> list:
        """[L^0, ..., L^J]: band-pass levels, finest first, then the low-pass residual."""
        levels = []
        while (min(x.shape[-2:]) >= 2 * LAPLACIAN_MIN_SIDE
               and (self.max_levels is None or len(levels) < self.max_levels)):
            low = self.blur(x)[..., ::2, ::2]                                # (N, C, H/2, W/2)
            up = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
            levels.append(x - up)
            x = low
        return levels + [x]

    def forward(self, a, b):
        with torch.autocast(a.device.type, enabled=False):
            diff = a.float() - b.float()  # the pyramid is linear: L(a) - L(b) = L(a - b)
            pixels = diff[0].numel()
            # the pyramid lists the finest level first: its k-th level has 4^-k of the pixels
            per_image = sum(4 ** k * level.abs().flatten(1).sum(1)
                            for k, level in enumerate(self.pyramid(diff)))   # (N,)
            return (per_image / pixels).mean()

    def extra_repr(self):
        return f"max_levels={self.max_levels}"


# ------------------------------------------------------------------------------------------------
# OverLORD: all networks of the three stages in one module

class OverLORD(nn.Module):
    """Stage 1: label table, per-image table, generator (+ correlated encoder). Stages 2-3:
    encoders that regress those codes, a generator copied from stage 1, a discriminator.
    The generator's input is always [uncorrelated, label(, correlated)]."""

    def __init__(self, cfg):
        super().__init__()
        size, corr_dim = cfg["img_shape"][0], cfg["correlated_dim"] if cfg["correlation"] else 0
        self.correlated = bool(cfg["correlation"])
        latent_dim = cfg["label_dim"] + cfg["uncorrelated_dim"] + corr_dim
        gen, enc = cfg["generator"], cfg["encoder"]

        def generator():
            return Generator(size, latent_dim, gen["channel_multiplier"], gen["max_width"])

        def encoder(dim):
            return CodeEncoder(size, dim, enc["base"], enc["max_width"])

        self.label_embedding = nn.Embedding(cfg["n_labels"], cfg["label_dim"])
        self.uncorrelated_embedding = nn.Embedding(cfg["n_imgs"], cfg["uncorrelated_dim"])
        for table in (self.label_embedding, self.uncorrelated_embedding):
            nn.init.uniform_(table.weight, -0.05, 0.05)
        self.generator = generator()
        self.correlated_encoder = encoder(corr_dim) if self.correlated else None

        self.label_encoder = encoder(cfg["label_dim"])
        self.uncorrelated_encoder = encoder(cfg["uncorrelated_dim"])
        self.correlated_amortized_encoder = encoder(corr_dim) if self.correlated else None
        self.amortized_generator = generator()
        disc = cfg["discriminator"]
        self.discriminator = Discriminator(size, disc["channel_multiplier"], disc["max_width"])

    @staticmethod
    def latent(uncorrelated, label, correlated=None):
        """The generator input: the codes that exist, concatenated in the original's order."""
        codes = [uncorrelated, label] + ([correlated] if correlated is not None else [])
        return torch.cat(codes, 1)  # (N, latent_dim)

    def table_codes(self, index, label, correlated_view=None):
        """Stage-1 codes (uncorrelated, label, correlated): tables and correlated encoder."""
        correlated = self.correlated_encoder(correlated_view) if self.correlated else None
        return self.uncorrelated_embedding(index), self.label_embedding(label), correlated

    def amortized_codes(self, x):
        """Stage-2/3 codes (uncorrelated, label, correlated) predicted from clean images."""
        correlated = self.correlated_amortized_encoder(x) if self.correlated else None
        return self.uncorrelated_encoder(x), self.label_encoder(x), correlated

    def amortized_encoders(self):
        """The encoders trained in stages 2 and 3."""
        return [m for m in (self.label_encoder, self.uncorrelated_encoder,
                            self.correlated_amortized_encoder) if m is not None]


def build_overlord(cfg):
    """OverLORD from a resolved config dict (preset + data fields: img_shape, n_imgs, n_labels)."""
    return OverLORD(cfg)
