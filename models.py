"""Networks of both methods, small parts first.

Content disentanglement (CD): Press et al., "Emerging Disentanglement in Auto-Encoder Based
Unsupervised Image Content Transfer", ICLR 2019, in the IN+ILN / nearest-upsampling variant of
kozistr/improved-ContentDisentanglement. A common encoder and a separate encoder feed one decoder;
a spectral-norm discriminator on the common code pushes the attribute into the separate code.
"""
from dataclasses import asdict, dataclass, fields

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
        # unbiased variances, as the original (torch.var's default)
        x_in = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(x.var((2, 3), keepdim=True) + self.eps)
        x_ln = (x - x.mean((1, 2, 3), keepdim=True)) / torch.sqrt(
            x.var((1, 2, 3), keepdim=True) + self.eps)
        return (self.rho * x_in + (1 - self.rho) * x_ln) * self.gamma + self.beta

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


class UpSampleBlock(nn.Module):
    """Nearest x2 -> reflection-padded 3x3 conv halving the channels -> ILN -> LReLU."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                  nn.ReflectionPad2d(1),
                                  nn.Conv2d(channels, channels // 2, 3, bias=False),
                                  ILN(channels // 2), lrelu())

    def forward(self, x):
        return self.body(x)


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


class Decoder(nn.Module):
    """Residual blocks on the full code, n_up nearest-neighbour upsamplings, 7x7 conv to RGB, tanh."""

    def __init__(self, code_channels=512, n_up=4, n_res_blocks=3):
        super().__init__()
        layers = [ResidualBlock(code_channels) for _ in range(n_res_blocks)]
        width = code_channels
        for _ in range(n_up):
            layers.append(UpSampleBlock(width))
            width //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, 3, 7, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, code):
        return self.net(code)  # (N, 3, R, R) in [-1, 1]


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
    n_blocks: int = 3             # encoder stride-2 blocks before the last; decoder upsamples n_blocks+1
    n_res_blocks: int = 3         # decoder residual blocks
    n_enc_res_blocks: int = 6     # residual blocks of each encoder
    e2_feats: int = 32            # separate encoder base width (kozistr's train.py used 512)

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
    """Common encoder, separate encoder, decoder and latent discriminator, with the codes' algebra."""

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

    def autoencoder_parameters(self):
        """Parameters of the two encoders and the decoder (one optimiser in the original)."""
        return [p for m in (self.common_encoder, self.separate_encoder, self.decoder)
                for p in m.parameters()]

    def zero_separate(self, common):
        """The separate code of a B image: zeros shaped like E2's output."""
        return common.new_zeros(common.shape[0], self.cfg.sep, *common.shape[2:])

    def decode(self, common, separate=None):
        """Image from [common, separate]; separate=None means the zero code (no attribute)."""
        if separate is None:
            separate = self.zero_separate(common)
        return self.decoder(torch.cat([common, separate], 1))

    def transfer(self, x_target, x_reference):
        """The attribute of `x_reference` (A images) put on `x_target`."""
        return self.decode(self.common_encoder(x_target), self.separate_encoder(x_reference))

    def remove(self, x):
        """`x` without the attribute: its common code with a zero separate code."""
        return self.decode(self.common_encoder(x))

    @torch.no_grad()
    def clamp_rho(self):
        """Keep every ILN blend weight in [0, 1] (done after each training step)."""
        for m in self.decoder.modules():
            if isinstance(m, ILN):
                m.rho.clamp_(0.0, 1.0)


def build_cd(cfg):
    """CDModel from a config dict (train flags or a checkpoint's stored config)."""
    return CDModel(CDConfig.from_dict(cfg))
