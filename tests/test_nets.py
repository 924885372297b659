"""ZF-5 and the torchvision trunks, preprocessing, the SPP head and checkpoints (SPEC.md §1, §3)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stages.core import nets
from stages.core.errors import SppError
from stages.core.nets import (SppHead, WithinChannelLRN, build_backbone, build_sppnet, load_checkpoint, preprocess,
                              resized_hw, save_checkpoint)
from stages.core.spp import spp_dim

SHARED_MOBILENET = Path(__file__).resolve().parents[2] / "shared/weights/mobilenet_v2_imagenet_features.pt"


# ------------------------------------------------------------------------------------------------ LRN


def lrn_loop_reference(x: torch.Tensor, size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> torch.Tensor:
    """Caffe WITHIN_CHANNEL, written out: scale = 1 + alpha/size^2 * sum of x^2 over the zero-padded window."""
    _, channels, height, width = x.shape
    half = size // 2
    out = torch.empty_like(x)
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                total = 0.0
                for di in range(-half, half + 1):
                    for dj in range(-half, half + 1):
                        if 0 <= i + di < height and 0 <= j + dj < width:
                            total += float(x[0, c, i + di, j + dj]) ** 2
                out[0, c, i, j] = x[0, c, i, j] * (1 + alpha / size**2 * total) ** (-beta)
    return out


def test_within_channel_lrn_matches_loop_reference():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64) * 60  # large enough for the normaliser to matter
    got = WithinChannelLRN(3, 5e-5, 0.75)(x)
    torch.testing.assert_close(got, lrn_loop_reference(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, x, rtol=1e-3)  # the test input is actually normalised
    # It differs from PyTorch's across-channel LRN.
    assert not torch.allclose(got, nn.LocalResponseNorm(3, 5e-5, 0.75, 1.0)(x), rtol=1e-4)


def test_within_channel_lrn_hand_value():
    # A single non-zero cell: its own window sums x^2 = 100^2 -> y = 100 * (1 + 5e-5 * 10000 / 9)^-0.75.
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 0, 0] = 100.0
    assert float(WithinChannelLRN()(x)[0, 0, 0, 0]) == pytest.approx(100.0 * (1 + 5e-5 * 10000 / 9) ** -0.75)


# ------------------------------------------------------------------------------------------------ ZF-5 sizes


def zf5_conv5_side(side: int) -> int:
    """The SPEC §1 arithmetic: conv 7/2 pad 1, ceil pool 3/2, conv 5/2, ceil pool 3/2; conv3-5 keep the size."""
    conv1 = (side + 2 - 7) // 2 + 1
    pool1 = -(-(conv1 - 3) // 2) + 1
    conv2 = (pool1 - 5) // 2 + 1
    return -(-(conv2 - 3) // 2) + 1


def test_zf5_size_arithmetic_matches_the_spec_table():
    # 180 gives 10 (88 -> 44 -> 20 -> 10), the paper's 10x10 for its 180-network [P §2.4], not 11.
    table = {224: 13, 180: 10, 480: 29, 576: 35, 688: 42, 864: 53, 874: 53, 1200: 74}
    assert {side: zf5_conv5_side(side) for side in table} == table


@pytest.mark.parametrize("side", [180, 224, 480, 576, 688, 864, 874, 1200])
def test_zf5_conv5_size(side):
    # The map size along one axis depends only on that axis: a narrow strip keeps large sides cheap.
    zf5 = build_backbone("zf5").eval()
    with torch.no_grad():
        out = zf5(torch.zeros(1, 3, side, 48))
    assert out.shape == (1, 256, zf5_conv5_side(side), zf5_conv5_side(48))
    assert out.shape[2] == {180: 10, 224: 13, 480: 29, 576: 35, 688: 42, 864: 53, 874: 53, 1200: 74}[side]


def test_zf5_layers_are_paper_exact():
    body = build_backbone("zf5").body
    assert (body.conv1.out_channels, body.conv1.kernel_size, body.conv1.stride, body.conv1.padding) == (96, (7, 7), (2, 2), (1, 1))
    assert (body.conv2.out_channels, body.conv2.kernel_size, body.conv2.stride, body.conv2.padding) == (256, (5, 5), (2, 2), (0, 0))
    assert [getattr(body, n).out_channels for n in ("conv3", "conv4", "conv5")] == [384, 384, 256]
    assert body.pool1.ceil_mode and body.pool2.ceil_mode
    assert isinstance(body.norm1, WithinChannelLRN) and (body.norm1.local_size, body.norm1.alpha, body.norm1.beta) == (3, 5e-5, 0.75)
    assert list(body._modules) == ["conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "norm2", "pool2",
                                   "conv3", "relu3", "conv4", "relu4", "conv5", "relu5"]


def test_zf5_width_scales_channels_only():
    # Half width: every layer's channels halved, the same kernels, strides and receptive-field geometry, so the
    # window -> conv5 cell mapping (the spec's stride and offsets) is the paper's.
    full, half = build_backbone("zf5"), build_backbone("zf5", width=0.5)
    convs = ("conv1", "conv2", "conv3", "conv4", "conv5")
    assert [getattr(half.body, n).out_channels for n in convs] == [48, 128, 192, 192, 128]
    for name in convs:
        a, b = getattr(full.body, name), getattr(half.body, name)
        assert (a.kernel_size, a.stride, a.padding) == (b.kernel_size, b.stride, b.padding)
    assert half.spec == dataclasses.replace(full.spec, channels=128) and half.width == 0.5
    with torch.no_grad():
        assert half.eval()(torch.zeros(1, 3, 224, 48)).shape == (1, 128, 13, zf5_conv5_side(48))
    with pytest.raises(SppError, match="model.width applies to zf5 only"):
        build_backbone("mobilenet_v2", width=0.5)
    with pytest.raises(SppError, match=r"model.width must be in \(0, 4\], got 0"):
        build_backbone("zf5", width=0)


@pytest.mark.parametrize("name", ["zf5", "mobilenet_v2"])
def test_conv5_maps_run_channels_last_with_the_same_values(name):
    """nets.conv5_maps: the trunk in NHWC (faster with oneDNN/cuDNN), the plain forward's values to float rounding,
    the maps left channels-last (SPP pooling reads them as [h, w, C] without a copy)."""
    torch.manual_seed(0)
    backbone = build_backbone(name, width=0.25 if name == "zf5" else 1.0).eval()
    images = torch.randn(2, 3, 97, 131)
    with torch.inference_mode():
        plain, fast = backbone(images), nets.conv5_maps(backbone, images)
    assert fast.shape == plain.shape and fast.is_contiguous(memory_format=torch.channels_last)
    assert float((fast - plain).abs().max()) <= 1e-4 * float(plain.abs().max())


def test_head_dropout_is_set_and_checked():
    head = SppHead(8, (1,), fc_dim=4, num_classes=2, dropout=0.3)
    assert head.dropout_p == 0.3 and head.dropout.p == 0.3
    head.set_dropout(0.0)
    assert head.dropout_p == 0.0 and head.dropout.p == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(SppError, match=r"fc dropout \(pretrain.dropout, model.dropout\) must be in \[0, 1\)"):
            head.set_dropout(bad)


# ------------------------------------------------------------------------------------------------ trunks, specs


# Every backbone's spec, receptive field and window -> cell mapping: tests/test_trunks.py.


@pytest.mark.skipif(not SHARED_MOBILENET.exists(), reason="shared MobileNetV2 weights not present")
def test_mobilenet_loads_the_shared_imagenet_weights():
    import torchvision

    backbone = build_backbone("mobilenet_v2", str(SHARED_MOBILENET))
    reference = torchvision.models.mobilenet_v2().features
    reference.load_state_dict(torch.load(SHARED_MOBILENET, weights_only=True))
    reference = reference[:14].eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), reference(x))


def test_backbone_weight_files_round_trip_and_errors(tmp_path):
    zf5 = build_backbone("zf5")
    plain = tmp_path / "zf5_body.pt"
    torch.save(zf5.body.state_dict(), plain)
    wrapped = tmp_path / "zf5_backbone.pt"
    torch.save(zf5.state_dict(), wrapped)  # keys "body.conv1.weight", ...
    for path in (plain, wrapped):
        loaded = build_backbone("zf5", str(path))
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), zf5.state_dict().values()))
    with pytest.raises(SppError, match="zf5_body.pt.*do not fit the mobilenet_v2 trunk"):
        build_backbone("mobilenet_v2", str(plain))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(SppError, match="garbage.pt: unreadable weights file"):
        build_backbone("zf5", str(garbage))
    with pytest.raises(SppError, match="missing.pt: no such weights file"):
        build_backbone("zf5", str(tmp_path / "missing.pt"))
    with pytest.raises(SppError, match="unknown torchvision weights"):
        build_backbone("alexnet", "Nope_Weights.IMAGENET1K_V1")
    with pytest.raises(SppError, match="unknown backbone"):
        build_backbone("resnet101")


def test_torchvision_features_file_with_layers_beyond_the_cut(tmp_path):
    import torchvision

    features = torchvision.models.mobilenet_v2().features  # all 19 blocks: the ones past [:14] are ignored
    path = tmp_path / "full_features.pt"
    torch.save(features.state_dict(), path)
    loaded = build_backbone("mobilenet_v2", str(path))
    assert torch.equal(loaded.body[13].conv[0][0].weight, features[13].conv[0][0].weight)


# ------------------------------------------------------------------------------------------------ preprocess


def test_resized_hw():
    assert resized_hw(375, 500, 688) == (688, 918)  # 500 * 688 / 375 = 917.33 -> ceil
    assert resized_hw(500, 375, 688) == (918, 688)
    assert resized_hw(300, 400, 600) == (600, 800)  # exact ratios never round up past the integer
    assert resized_hw(100, 100, 224) == (224, 224)


def test_preprocess_bgr128_hand_values():
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[:, :, 0] = [[10, 20], [30, 40]]  # R
    image[:, :, 1] = 128  # G
    image[:, :, 2] = 255  # B
    spec = build_backbone("zf5").spec
    out = preprocess(image, 2, spec)  # no resize
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    assert out[0].tolist() == [[127.0, 127.0], [127.0, 127.0]]  # B - 128 first
    assert out[1].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert out[2].tolist() == [[-118.0, -108.0], [-98.0, -88.0]]  # R - 128 last


def test_preprocess_bilinear_without_antialias_hand_values():
    # Grey ramp [0, 4] -> 4 columns, pixel centres at source x = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (to 1):
    # 0, 1, 3, 4 -> minus 128.
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[:, 1, :] = 4
    out = preprocess(image, 4, build_backbone("zf5").spec)
    assert out.shape == (3, 4, 4)
    assert out[1, 0].tolist() == [-128.0, -127.0, -125.0, -124.0]
    # Downscaling does not antialias: 8 columns -> 2 take pixels 1.5 -> 1..2 and 5.5 -> 5..6 only.
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :, :] = np.array([0, 10, 20, 30, 40, 50, 60, 70], dtype=np.uint8)[None, :, None]
    out = preprocess(image, 2, build_backbone("zf5").spec)
    assert out[0, 0].tolist() == [15.0 - 128, 55.0 - 128]


def test_preprocess_imagenet_mode():
    image = np.full((4, 6, 3), 255, dtype=np.uint8)
    out = preprocess(image, 4, build_backbone("mobilenet_v2").spec)
    expected = [(1 - m) / s for m, s in zip(nets.IMAGENET_MEAN, nets.IMAGENET_STD)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected))
    with pytest.raises(ValueError):
        preprocess(np.zeros((4, 4, 3), dtype=np.float32), 4, build_backbone("zf5").spec)


# ------------------------------------------------------------------------------------------------ head, net


def test_spp_head_dimensions_and_features():
    torch.manual_seed(0)
    head = SppHead(256, (1, 2, 3, 6), fc_dim=64, num_classes=21)
    assert head.fc6.in_features == 12800 == spp_dim(256, (1, 2, 3, 6))
    pooled = torch.rand(5, 12800)
    head.train()  # features() never applies dropout, whatever the mode
    fc7 = head.features(pooled, "fc7")
    assert torch.equal(fc7, head.features(pooled, "fc7")) and (fc7 >= 0).all()
    assert (head.features(pooled, "fc6") >= 0).all() and head.features(pooled, "fc6").shape == (5, 64)
    assert head.features(pooled, "pool5") is pooled
    head.eval()
    torch.testing.assert_close(head(pooled), head.fc8(fc7))
    with pytest.raises(ValueError):
        head.features(pooled, "fc8")


def test_replace_fc8():
    torch.manual_seed(0)
    head = SppHead(8, (1, 2), fc_dim=4096, num_classes=1000)
    old_fc7 = head.fc7.weight.clone()
    fc8 = head.replace_fc8(21)
    assert head.fc8 is fc8 and fc8.weight.shape == (21, 4096) and head.num_classes == 21
    assert abs(fc8.weight.std().item() - 0.01) < 0.0005 and abs(fc8.weight.mean().item()) < 0.0005
    assert torch.equal(head.fc7.weight, old_fc7)
    assert head(torch.rand(2, 40)).shape == (2, 21)


def test_sppnet_forward_multi_size():
    net = build_sppnet("zf5", pyramid=(1, 2, 3, 6), fc_dim=32, num_classes=7).eval()
    with torch.no_grad():
        for side in (180, 224):  # multi-size training: the fc input does not depend on the map size
            assert net(torch.randn(2, 3, side, side)).shape == (2, 7)
    assert net.pyramid == (1, 2, 3, 6) and net.head.fc6.in_features == 12800


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_sppnet("zf5", pyramid=(1, 2), fc_dim=16, num_classes=3, class_names=("a", "b", "c")).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, net, {"epochs": 2, "note": "test"})
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["format"] == "sppnet-checkpoint"
    loaded, meta = load_checkpoint(path, expect_backbone="zf5")
    assert meta["backbone"] == "zf5" and meta["pyramid"] == [1, 2] and meta["fc_dim"] == 16
    assert meta["num_classes"] == 3 and meta["class_names"] == ["a", "b", "c"] and meta["epochs"] == 2
    assert meta["spec"]["offset0"] == 21.0
    assert loaded.class_names == ("a", "b", "c") and loaded.pyramid == (1, 2)
    x = torch.randn(1, 3, 100, 120)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net(x), rtol=0, atol=0)
    # A narrower ZF-5 rebuilds at its own width (the meta records it; old checkpoints without it are width 1).
    narrow = build_sppnet("zf5", pyramid=(1, 2), fc_dim=16, num_classes=3, width=0.25).eval()
    save_checkpoint(tmp_path / "narrow.pt", narrow, {})
    loaded_narrow, narrow_meta = load_checkpoint(tmp_path / "narrow.pt")
    assert narrow_meta["width"] == 0.25 and loaded_narrow.width == 0.25 and loaded_narrow.spec.channels == 64
    with torch.no_grad():
        torch.testing.assert_close(loaded_narrow.eval()(x), narrow(x), rtol=0, atol=0)
    # A fine-tuned head (new fc8) round-trips with its new class count.
    net.head.replace_fc8(5)
    save_checkpoint(path, net, {"class_names": ["bg", "1", "2", "3", "4"]})
    assert load_checkpoint(path)[0].head.fc8.out_features == 5


def test_checkpoint_loaded_without_random_init_is_the_same_network(tmp_path):
    # random_init=False (detection, train-svm): built on the meta device, every tensor from the file; the global
    # RNG is left alone, where the default draws from it as a fresh build does (pretrain seeds before loading).
    torch.manual_seed(0)
    net = build_sppnet("zf5", fc_dim=32, num_classes=5, width=0.5)
    save_checkpoint(tmp_path / "model.pt", net, {})
    state = torch.random.get_rng_state()
    fast, _ = load_checkpoint(tmp_path / "model.pt", random_init=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    plain, _ = load_checkpoint(tmp_path / "model.pt")
    assert not torch.equal(torch.random.get_rng_state(), state)
    assert not any(t.is_meta for t in (*fast.parameters(), *fast.buffers()))
    assert all(p.requires_grad for p in fast.parameters())
    for (name, a), (other, b) in zip(fast.state_dict().items(), plain.state_dict().items()):
        assert name == other and torch.equal(a, b)
    image = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(fast.eval()(image), plain.eval()(image))


def test_checkpoint_errors(tmp_path):
    net = build_sppnet("zf5", pyramid=(1,), fc_dim=8, num_classes=2)
    path = tmp_path / "model.pt"
    save_checkpoint(path, net, {})
    with pytest.raises(SppError, match=r"model.pt: checkpoint is for backbone zf5, the run uses mobilenet_v2"):
        load_checkpoint(path, expect_backbone="mobilenet_v2")
    with pytest.raises(SppError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SppError, match="broken.pt: unreadable checkpoint"):
        load_checkpoint(broken)
    foreign = tmp_path / "foreign.pt"
    torch.save(net.state_dict(), foreign)
    with pytest.raises(SppError, match="foreign.pt: not an sppnet checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(ValueError):
        save_checkpoint(path, net, {"class_names": ["only one"]})
    # The trunk of a checkpoint is a valid ``weights`` file for build_backbone.
    trunk = build_backbone("zf5", str(path))
    assert torch.equal(trunk.body.conv1.weight, net.backbone.body.conv1.weight)


def test_resolve_device():
    assert nets.resolve_device("cpu").type == "cpu"
    assert nets.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SppError):
        nets.resolve_device("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sppnet_runs_on_cuda():
    net = build_sppnet("zf5", fc_dim=32, num_classes=4).cuda().eval()
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    x = preprocess(image, 224, net.spec, device="cuda")
    assert x.is_cuda and x.shape == (3, 224, 299)
    with torch.no_grad():
        gpu = net(x[None]).cpu()
        cpu = net.cpu()(preprocess(image, 224, net.spec)[None])
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)
