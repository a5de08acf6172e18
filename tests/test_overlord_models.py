"""The OverLORD / StyleGAN2 networks: exact maths on tiny inputs, full-size checksums."""
import math
import socket
import pytest
import torch
import torch.nn.functional as F

import models as om
import train


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------
# Primitives

def test_blur_kernel_sums_to_one_and_is_symmetric():
    k = om.make_blur_kernel()
    assert k.shape == (4, 4)
    assert torch.isclose(k.sum(), torch.tensor(1.0))
    assert torch.equal(k, k.t()) and torch.equal(k, k.flip((0, 1)))
    assert torch.isclose(om.Blur((1, 1), upsample_factor=2).kernel.sum(), torch.tensor(4.0))


def test_stylegan_channels_table_and_cap():
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    assert {r: om.stylegan_channels(r) for r in table} == table
    assert om.stylegan_channels(64, channel_multiplier=1) == 256
    assert om.stylegan_channels(8, max_width=64) == 64
    assert om.stylegan_channels(256, max_width=64) == 64
    with pytest.raises(ValueError):
        om.stylegan_channels(48)


@pytest.mark.parametrize("h, up, down, pad, kernel_gain, expected", [
    (17, 1, 1, (1, 1), 4, 16),  # blur after the k=3 transposed conv: 2H+1 -> 2H
    (8, 2, 1, (2, 1), 4, 16),   # Upsample on the RGB skip: H -> 2H
    (8, 1, 1, (2, 2), 1, 9),    # blur before a stride-2 3×3 conv: H -> H+1
    (8, 1, 1, (1, 1), 1, 7),    # blur before a stride-2 1×1 conv: H -> H-1
    (8, 2, 2, (1, 0), 1, 7),    # general formula (H·up + p0 + p1 - kh) // down + 1
])
def test_upfirdn2d_output_sizes(h, up, down, pad, kernel_gain, expected):
    x = torch.randn(2, 3, h, h)
    y = om.upfirdn2d(x, om.make_blur_kernel() * kernel_gain, up=up, down=down, pad=pad)
    assert y.shape == (2, 3, expected, expected)
    assert expected == (h * up + sum(pad) - 4) // down + 1


def naive_upfirdn2d(x, kernel, up, down, pad):
    """Loop reference: zero insertion, zero pad / crop, true convolution, decimation."""
    n, c, h, w = x.shape
    z = torch.zeros(n, c, h * up, w * up)
    z[:, :, ::up, ::up] = x
    p0, p1 = pad
    padded = torch.zeros(n, c, h * up + max(p0, 0) + max(p1, 0), w * up + max(p0, 0) + max(p1, 0))
    padded[:, :, max(p0, 0):max(p0, 0) + h * up, max(p0, 0):max(p0, 0) + w * up] = z
    lo = -min(p0, 0)
    padded = padded[:, :, lo:padded.shape[2] + min(p1, 0), lo:padded.shape[3] + min(p1, 0)]
    kh, kw = kernel.shape
    out_h, out_w = padded.shape[2] - kh + 1, padded.shape[3] - kw + 1
    out = torch.zeros(n, c, out_h, out_w)
    for i in range(out_h):
        for j in range(out_w):
            for a in range(kh):
                for b in range(kw):
                    out[:, :, i, j] += padded[:, :, i + a, j + b] * kernel[kh - 1 - a, kw - 1 - b]
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up, down, pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (-1, 2))])
def test_upfirdn2d_matches_naive_loops(up, down, pad):
    x = torch.randn(1, 2, 5, 5)
    kernel = torch.arange(1.0, 10.0).reshape(3, 3)  # asymmetric, so a missing flip would show
    expected = naive_upfirdn2d(x, kernel, up, down, pad)
    assert torch.allclose(om.upfirdn2d(x, kernel, up, down, pad), expected, atol=1e-5)


def test_upsample_keeps_constant_interior_and_fades_the_border():
    y = om.Upsample()(torch.ones(1, 2, 8, 8))
    assert y.shape == (1, 2, 16, 16)
    assert torch.allclose(y[..., 1:-1, 1:-1], torch.ones(1, 2, 14, 14))
    # zero padding: the outer ring reads 0.75 on the edges and 0.75² in the corners
    assert torch.allclose(y[..., 0, 1:-1], torch.full((1, 2, 14), 0.75))
    assert torch.allclose(y[..., 1:-1, -1], torch.full((1, 2, 14), 0.75))
    corners = y[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.allclose(corners, torch.full_like(corners, 0.5625))


def test_equal_linear_fused_activation_matches_formula():
    layer = om.EqualLinear(6, 4, bias_init=0.3, activate=True)
    x = torch.randn(5, 6)
    pre = x @ (layer.weight / math.sqrt(6)).t() + 0.3
    assert torch.allclose(layer(x), F.leaky_relu(pre, 0.2) * math.sqrt(2), atol=1e-6)


def per_sample_weights(conv, style):
    """Each sample's modulated weights built by hand, (out, in, k, k) per sample."""
    weights = []
    for s in conv.modulation(style):
        fan_in = conv.in_channels * conv.kernel_size ** 2
        w = conv.weight[0] * s[None, :, None, None] / math.sqrt(fan_in)
        if conv.demodulate:
            w = w / torch.sqrt(w.pow(2).sum((1, 2, 3), keepdim=True) + 1e-8)
        weights.append(w)
    return weights


@pytest.mark.parametrize("kernel_size, demodulate", [(3, True), (3, False), (1, False)])
def test_modulated_conv_equals_per_sample_conv(kernel_size, demodulate):
    conv = om.ModulatedConv2d(4, 5, kernel_size, style_dim=7, demodulate=demodulate)
    x, style = torch.randn(3, 4, 6, 6), torch.randn(3, 7)
    expected = torch.cat([F.conv2d(x[n:n + 1], w, padding=kernel_size // 2)
                          for n, w in enumerate(per_sample_weights(conv, style))])
    assert torch.allclose(conv(x, style), expected, atol=1e-5)


def test_modulated_conv_upsample_equals_per_sample_transposed_conv_and_blur():
    conv = om.ModulatedConv2d(4, 5, 3, style_dim=7, upsample=True)
    x, style = torch.randn(3, 4, 6, 6), torch.randn(3, 7)
    blur = (om.make_blur_kernel() * 4).expand(5, 1, 4, 4)
    expected = []
    for n, w in enumerate(per_sample_weights(conv, style)):
        y = F.conv_transpose2d(x[n:n + 1], w.transpose(0, 1), stride=2)  # (1, 5, 13, 13)
        expected.append(F.conv2d(y, blur, padding=1, groups=5))  # symmetric kernel: no flip needed
    out = conv(x, style)
    assert out.shape == (3, 5, 12, 12)
    assert torch.allclose(out, torch.cat(expected), atol=1e-5)


def test_minibatch_stddev_matches_explicit_groups():
    x = torch.randn(8, 3, 4, 4)
    y = om.MinibatchStdDev(4)(x)
    assert y.shape == (8, 4, 4, 4) and torch.equal(y[:, :3], x)
    for m in range(2):  # group m holds samples m, m + 2, m + 4, m + 6
        members = x[m::2]
        value = torch.sqrt(members.var(0, unbiased=False) + 1e-8).mean()
        assert torch.allclose(y[m::2, 3], value.expand(4, 4, 4), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Parameter-count checksums (SPEC B3, C.6); built on the meta device, so nothing is allocated

@pytest.mark.parametrize("img_size, latent_dim, expected", [
    (128, 576, 27_751_698), (256, 512, 27_933_077), (256, 576, 28_490_133), (256, 640, 29_047_189)])
def test_generator_checksum(img_size, latent_dim, expected):
    with torch.device("meta"):
        assert n_params(om.Generator(img_size, latent_dim)) == expected


@pytest.mark.parametrize("img_size, code_dim, expected", [
    (128, 64, 5_202_048), (128, 512, 5_317_184), (256, 64, 6_382_208), (256, 256, 6_431_552),
    (256, 512, 6_497_344)])
def test_encoder_checksum(img_size, code_dim, expected):
    with torch.device("meta"):
        assert n_params(om.CodeEncoder(img_size, code_dim)) == expected


@pytest.mark.parametrize("img_size, expected", [(256, 28_864_129), (128, 28_389_121)])
def test_discriminator_checksum(img_size, expected):
    with torch.device("meta"):
        assert n_params(om.Discriminator(img_size)) == expected


# ------------------------------------------------------------------------------------------------
# Networks at 32 px with narrow widths

def test_generator_output_shape_and_gradient_to_latent():
    gen = om.Generator(32, latent_dim=10, max_width=16)
    assert max(p.shape[1] for p in gen.parameters() if p.ndim == 5) <= 16
    latent = torch.randn(2, 10, requires_grad=True)
    img = gen(latent)
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
    img.square().mean().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0


def test_generator_rejects_bad_sizes():
    for size in (4, 48):
        with pytest.raises(ValueError):
            om.Generator(size, 8, max_width=8)


def test_encoder_output_shape():
    enc = om.CodeEncoder(32, code_dim=5, base=8, max_width=16)
    assert enc(torch.rand(3, 3, 32, 32)).shape == (3, 5)


def test_discriminator_logits_and_group_check():
    disc = om.Discriminator(32, max_width=16)
    assert disc(torch.rand(4, 3, 32, 32)).shape == (4, 1)
    assert disc(torch.rand(2, 3, 32, 32)).shape == (2, 1)  # group = min(N, 4) = 2
    with pytest.raises(ValueError, match="divisible by 4"):
        disc(torch.rand(6, 3, 32, 32))


# ------------------------------------------------------------------------------------------------
# Perceptual distance

@pytest.fixture(scope="module")
def random_vgg():
    return om.VGGDistance(weights="random")


def test_vgg_distance_zero_for_identical_and_positive_otherwise(random_vgg):
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert random_vgg(a, a.clone()).item() == 0.0
    assert random_vgg(a, b).item() > 0.0


def test_vgg_distance_is_frozen_but_passes_gradients(random_vgg):
    assert not any(p.requires_grad for p in random_vgg.parameters())
    random_vgg.train()
    assert not random_vgg.training and not random_vgg.features.training
    a = torch.rand(2, 3, 32, 32, requires_grad=True)
    random_vgg(a, torch.rand(2, 3, 32, 32)).backward()
    assert a.grad.abs().sum() > 0


def test_vgg_distance_reads_post_relu_activations(random_vgg):
    assert random_vgg.capture_ids == (3, 8, 13, 22, 30)  # relu1_2, relu2_2, relu3_2, relu4_3, pool5
    x = torch.rand(2, 3, 32, 32)
    feats = random_vgg.activations(x)
    assert [f.shape[1:] for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4),
                                            (512, 1, 1)]
    normed = (x - random_vgg.mean) / random_vgg.std
    assert torch.allclose(feats[1], random_vgg.features[:9](normed), atol=1e-5)
    assert all((f >= 0).all() for f in feats)


def test_vgg_distance_matches_formula(random_vgg):
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    expected = (a - b).abs().mean((1, 2, 3))
    for fa, fb in zip(random_vgg.activations(a), random_vgg.activations(b)):
        expected = expected + (fa - fb).abs().mean((1, 2, 3))
    assert torch.allclose(random_vgg(a, b), expected.mean(), rtol=1e-5)


def test_vgg_loads_local_torchvision_state_dict(tmp_path, monkeypatch):
    source = om.vgg16_features()
    state = {f"features.{k}": v for k, v in source.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a full checkpoint's head is ignored
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    cached = tmp_path / "checkpoints" / om.VGG16_WEIGHTS_FILE
    torch.save(state, cached)
    assert om.find_vgg_weights() == str(cached)
    dist = om.VGGDistance(layer_ids=(2, 7))
    assert dist.source == str(cached) and len(dist.features) == 9
    assert torch.equal(dist.features[2].weight, source[2].weight)
    assert om.VGGDistance(layer_ids=(2,), weights=str(cached)).source == str(cached)


def test_missing_vgg_weights_give_none_and_a_clear_error_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert om.find_vgg_weights() is None
    assert om.find_vgg_weights(str(tmp_path / "missing.pth")) is None
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        om.VGGDistance()


def test_l1_distance_fallback():
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert om.L1Distance()(a, a).item() == 0.0
    assert torch.allclose(om.L1Distance()(a, b), (a - b).abs().mean())


# ------------------------------------------------------------------------------------------------
# Losses

def test_r1_penalty_on_linear_discriminator():
    w = torch.randn(1, 3, 4, 4, requires_grad=True)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).sum((1, 2, 3))[:, None] + 0.7  # dD/dx = w for every sample
    penalty = train.r1_penalty(logits, x)
    assert torch.allclose(penalty, 0.5 * w.pow(2).sum())
    penalty.backward()  # graph kept: d(0.5·|w|²)/dw = w
    assert torch.allclose(w.grad, w)


def test_r1_penalty_on_quadratic_discriminator():
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    logits = x.pow(2).sum((1, 2, 3))  # dD/dx = 2x
    expected = 0.5 * (2 * x).pow(2).flatten(1).sum(1).mean()
    assert torch.allclose(train.r1_penalty(logits, x), expected)


def test_adversarial_loss_targets():
    logits = torch.tensor([[0.5], [-1.0]])
    assert torch.allclose(train.adversarial_loss(logits, real=True), -F.logsigmoid(logits).mean())
    assert torch.allclose(train.adversarial_loss(logits, real=False), -F.logsigmoid(-logits).mean())


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 1)), (2, 1, (2, 1)), (1, 2, (2, 2)),
                                         (1, 1, (1, 1)), (2, 1, (-1, 0))])
def test_separable_filter_path_equals_the_2d_kernel(up, down, pad):
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    k1 = (1.0, 2.0, 5.0, 3.0)  # asymmetric, so a missing flip would show
    kernel = torch.outer(torch.tensor(k1), torch.tensor(k1)).double()
    kernel = kernel / kernel.sum()
    taps = om.separable_taps(k1)
    expected = om.upfirdn2d(x, kernel, up=up, down=down, pad=pad)
    assert torch.allclose(om.upfirdn2d(x, taps, up=up, down=down, pad=pad), expected)
