"""Every backbone's window -> conv5 mapping checked against the network itself (SPEC.md §1-2), the dilated
MobileNetV2 cuts, and local weights files for the torchvision trunks (no downloads: files are written here from
randomly initialised torchvision models)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stages.core.errors import SppError
from stages.core.nets import (BACKBONES, BackboneSpec, WithinChannelLRN, build_backbone, build_sppnet,
                              load_checkpoint, receptive_field, save_checkpoint)
from stages.core.spp import boxes_to_cells

SHARED_MOBILENET = Path(__file__).resolve().parents[2] / "shared/weights/mobilenet_v2_imagenet_features.pt"
MOBILENET_CUTS = {"mobilenet_v2": 14, "mobilenet_v2_c17": 17, "mobilenet_v2_c18": 18, "mobilenet_v2_c19": 19}


# ------------------------------------------------------------------------------------------------ names, specs


def test_backbone_names_and_specs():
    # offset0 by hand (0-based centre of cell 0, + 1): each layer adds (d (k-1)/2 - p) * jump.
    #   zf5: conv1 (3-1)*1 = 2, pool1 1*2 -> 4, conv2 2*4 -> 12, pool2 1*8 -> 20 -> 21 (SPEC §1)
    #   alexnet: conv1 (5-2)*1 = 3, pool 1*4 -> 7, conv2 0, pool 1*8 -> 15 -> 16
    #   vgg16: pools 2/2 add 0.5*jump: 0.5 + 1 + 2 + 4 = 7.5 -> 8.5
    #   mobilenet_v2 (all cuts), resnet18/50: every conv and pool is padded by d (k-1)/2 -> 0 -> 1
    expected = {"zf5": (256, 21.0, "bgr128"), "mobilenet_v2": (96, 1.0, "imagenet"),
                "mobilenet_v2_c17": (160, 1.0, "imagenet"), "mobilenet_v2_c18": (320, 1.0, "imagenet"),
                "mobilenet_v2_c19": (1280, 1.0, "imagenet"), "alexnet": (256, 16.0, "imagenet"),
                "vgg16": (512, 8.5, "imagenet"), "resnet18": (256, 1.0, "imagenet"),
                "resnet50": (1024, 1.0, "imagenet")}
    assert BACKBONES == tuple(expected)
    for name, (channels, offset0, pixel_mode) in expected.items():
        assert build_backbone(name).spec == BackboneSpec(name, 16, channels, offset0, 6.5, pixel_mode), name
    with pytest.raises(SppError, match=r"unknown backbone 'resnet101' \(known: zf5, mobilenet_v2, "
                                       r"mobilenet_v2_c17, .*resnet50\)"):
        build_backbone("resnet101")


# ------------------------------------------------------------------------------------------------ receptive fields


def _geometry_only(body: nn.Module) -> nn.Module:
    """A 1-channel copy of ``body`` (same module tree and forward code, same kernels, strides, paddings,
    dilations, ceil modes and residual additions) with all-ones convs, average pools for max pools and no
    BatchNorm / ReLU / LRN: a linear map with positive weights, so the gradient of one output cell is non-zero
    exactly on that cell's receptive field, whatever ReLUs would kill in the real net."""
    model = copy.deepcopy(body).double()

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                conv = nn.Conv2d(1, 1, child.kernel_size, child.stride, child.padding, child.dilation, bias=False)
                nn.init.ones_(conv.weight)
                setattr(parent, name, conv.double())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
            elif isinstance(child, (nn.ReLU, nn.ReLU6, nn.BatchNorm2d, nn.Dropout, WithinChannelLRN)):
                setattr(parent, name, nn.Identity())
            else:
                replace(child)

    replace(model)
    return model.eval()


def _field_extents(probe: nn.Module, length: int, axis: int) -> list[tuple[int, int]]:
    """For each conv5 cell along ``axis`` (0: y, 1: x) of a 64 x ``length`` strip (transposed for y): the first
    and last 0-based pixel of its receptive field along that axis, from the gradient of that cell."""
    shape = (1, 1, 64, length) if axis == 1 else (1, 1, length, 64)
    image = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    out = probe(image)[0, 0]
    extents = []
    for j in range(out.shape[axis]):
        cell = out[out.shape[0] // 2, j] if axis == 1 else out[j, out.shape[1] // 2]
        (grad,) = torch.autograd.grad(cell, image, retain_graph=True)
        hits = torch.nonzero(grad[0, 0].abs().sum(dim=1 - axis)).flatten()
        extents.append((int(hits.min()), int(hits.max())))
    return extents


@pytest.mark.parametrize("name", BACKBONES)
def test_window_to_cell_mapping_matches_the_network(name):
    """Receptive-field centres measured on the network vs ``offset0 + stride * j`` and ``boxes_to_cells``.

    The probe keeps the trunk's modules and forward code (only channels, weights and nonlinearities differ),
    and produces maps of the same size as the real trunk. On a strip 768 px long, each cell's receptive field
    along it is the support of its gradient; the cells whose field is not cut by the border (the widest
    supports) have centre (first + last)/2 + 1 (1-based), which must be the spec's centre of that cell. Then a
    bright pixel anywhere between them falls in the cell the mapping predicts, the one centred nearest.
    """
    backbone = build_backbone(name).eval()
    spec = backbone.spec
    probe = _geometry_only(backbone.body)
    shapes = []
    for size in [(97, 113), (97 + 32, 113 + 64)]:  # the probe has the real trunk's geometry
        with torch.no_grad():
            real = backbone(torch.zeros(1, 3, *size)).shape
            assert real[:2] == (1, spec.channels), name
            assert probe(torch.zeros(1, 1, *size, dtype=torch.float64)).shape[-2:] == real[-2:], (name, size)
        shapes.append(real[-2:])
    # Stride 16: 32 more pixels -> 2 more cells, 64 more -> 4 more.
    assert (shapes[1][0] - shapes[0][0], shapes[1][1] - shapes[0][1]) == (2, 4), name

    for axis in (1, 0):
        extents = _field_extents(probe, 768, axis)
        width = max(last - first for first, last in extents)
        whole = [j for j, (first, last) in enumerate(extents) if last - first == width]
        assert len(whole) >= 5 and whole == list(range(whole[0], whole[-1] + 1)), (name, axis, whole)
        assert all(first > 0 and last < 767 for first, last in (extents[j] for j in whole))
        centres = {j: (extents[j][0] + extents[j][1]) / 2 + 1 for j in whole}  # 1-based pixel
        assert centres == {j: spec.offset0 + spec.stride * j for j in whole}, (name, axis)

        # A bright pixel at x (1-based): the cell centred nearest on the network is the one the mapping picks.
        known = np.array(sorted(centres.values()))
        cells = np.array(sorted(centres))
        for x in np.arange(known[0], known[-1] + 0.5, 0.5):
            distance = np.abs(known - x)
            if np.sum(distance == distance.min()) > 1:
                continue  # half-way between two centres
            nearest = int(cells[np.argmin(distance)])
            assert nearest == int(np.floor((x - spec.offset0) / spec.stride + 0.5)), (name, axis, x)
        # boxes_to_cells (SPEC §2 step 3): a window maps to the cells whose measured centres lie inside it, with
        # 1.5 px of slack (random boxes of 16+ px between the measured centres, so the set is never empty).
        rng = np.random.default_rng(0)
        for _ in range(200):
            x1 = rng.uniform(known[0] + 2, known[-1] - 18)
            x2 = rng.uniform(x1 + 16, known[-1] - 2)
            inside = cells[(known > x1 - 1.5) & (known < x2 + 1.5)]
            box = [x1, 1.0, x2, 1.0] if axis == 1 else [1.0, x1, 1.0, x2]
            got = boxes_to_cells(np.array([box]), (1000, 1000), spec)[0]
            assert (got[axis ^ 1], got[2 + (axis ^ 1)]) == (inside[0], inside[-1]), (name, axis, x1, x2)
        # A point box on a measured centre maps to that cell.
        for j, c in centres.items():
            box = [c, 1.0, c, 1.0] if axis == 1 else [1.0, c, 1.0, c]
            got = boxes_to_cells(np.array([box]), (1000, 1000), spec)[0]
            assert got[axis ^ 1] == got[2 + (axis ^ 1)] == j, (name, axis, j)


def test_receptive_field_rules():
    # conv 3/2 pad 0: centre 1, jump 2; pool 2/2: + 0.5 * 2 = 2, jump 4; dilated conv (k 3, d 3, pad 1):
    # + (3 - 1) * 4 = 10 -> 1-based 11.
    toy = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.MaxPool2d(2, 2), nn.ReLU(),
                        nn.Conv2d(1, 1, 3, padding=1, dilation=3))
    assert receptive_field(toy) == (4, 11.0)
    from torchvision.models.resnet import BasicBlock

    # A residual block whose shortcut samples other pixels than its main path has no single centre.
    shifted = BasicBlock(2, 2, stride=2, downsample=nn.Conv2d(2, 2, 2, stride=2))
    with pytest.raises(AssertionError, match=r"BasicBlock: main path \(stride, centre\) \(2, 0.0\) != shortcut"):
        receptive_field(nn.Sequential(shifted))
    aligned = BasicBlock(2, 2, stride=2, downsample=nn.Conv2d(2, 2, 1, stride=2))
    assert receptive_field(nn.Sequential(nn.Conv2d(3, 2, 3, padding=0), aligned)) == (2, 2.0)
    with pytest.raises(TypeError, match="no rule for Upsample"):  # an unknown layer is never guessed
        receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2)))


# ------------------------------------------------------------------------------------------------ MobileNetV2 cuts


def _randomised_mobilenet_features(seed: int = 0) -> nn.Sequential:
    """torchvision's MobileNetV2 ``features`` with random weights and non-trivial BatchNorm statistics."""
    import torchvision

    torch.manual_seed(seed)
    features = torchvision.models.mobilenet_v2().features
    for module in features.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return features.eval()


def test_mobilenet_v2_cuts_are_dilated_a_trous():
    old = build_backbone("mobilenet_v2").body
    assert len(old) == 14 and all(m.dilation == (1, 1) for m in old.modules() if isinstance(m, nn.Conv2d))
    for name, cut in MOBILENET_CUTS.items():
        if cut == 14:
            continue
        body = build_backbone(name).body
        assert len(body) == cut
        depthwise = {i: body[i].conv[1][0] for i in range(14, min(cut, 18))}
        assert (depthwise[14].stride, depthwise[14].dilation, depthwise[14].padding) == ((1, 1), (1, 1), (1, 1))
        for i in range(15, min(cut, 18)):
            assert (depthwise[i].stride, depthwise[i].dilation, depthwise[i].padding) == ((1, 1), (2, 2), (2, 2))
        strided = [m for m in body.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
        assert len(strided) == 4  # features 0, 2, 4, 7: stride 16
        assert [m.out_channels for m in body.modules() if isinstance(m, nn.Conv2d)][-1] == {17: 160, 18: 320,
                                                                                             19: 1280}[cut]


def test_dilated_cuts_compute_the_imagenet_trunk_twice_as_densely(tmp_path):
    """Cell 2i of a dilated cut is cell i of the undilated stride-32 trunk with the same weights (a trous)."""
    features = _randomised_mobilenet_features()
    path = tmp_path / "features.pt"
    torch.save(features.state_dict(), path)
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        for name, cut in MOBILENET_CUTS.items():
            dense = build_backbone(name, str(path)).eval()(x)
            reference = features[:cut](x)
            if cut == 14:
                torch.testing.assert_close(dense, reference, rtol=0, atol=0)
            else:
                assert dense.shape[-2:] == (7, 8) and reference.shape[-2:] == (4, 4)
                torch.testing.assert_close(dense[..., ::2, ::2], reference, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not SHARED_MOBILENET.exists(), reason="shared MobileNetV2 weights not present")
def test_the_shared_imagenet_file_loads_into_every_mobilenet_cut():
    import torchvision

    reference = torchvision.models.mobilenet_v2().features
    reference.load_state_dict(torch.load(SHARED_MOBILENET, weights_only=True))
    reference.eval()
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        for name, cut in MOBILENET_CUTS.items():
            out = build_backbone(name, str(SHARED_MOBILENET)).eval()(x)
            step = 1 if cut == 14 else 2
            torch.testing.assert_close(out[..., ::step, ::step], reference[:cut](x), rtol=1e-4, atol=1e-4)


def test_mobilenet_cuts_accept_features_or_model_files_and_refuse_short_ones(tmp_path):
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v2()  # the whole model: features.* and classifier.1.*
    files = {"model": tmp_path / "model.pt", "features": tmp_path / "features.pt"}
    torch.save(model.state_dict(), files["model"])
    torch.save(model.features.state_dict(), files["features"])
    reference = model.features.state_dict()
    for name, cut in MOBILENET_CUTS.items():
        for path in files.values():
            loaded = build_backbone(name, str(path)).body.state_dict()
            assert len(loaded) == sum(int(k.split(".")[0]) < cut for k in reference), (name, path.name)
            assert all(torch.equal(v, reference[k]) for k, v in loaded.items()), (name, path.name)
    # Blocks 0-15 only: enough for the old cut, not for the longer ones (strict on the kept layers).
    short = tmp_path / "short.pt"
    torch.save({k: v for k, v in model.features.state_dict().items() if int(k.split(".")[0]) < 16}, short)
    build_backbone("mobilenet_v2", str(short))
    for name in ("mobilenet_v2_c17", "mobilenet_v2_c18", "mobilenet_v2_c19"):
        with pytest.raises(SppError) as err:
            build_backbone(name, str(short))
        text = str(err.value)
        assert text.startswith(f"{short}: weights do not fit the {name} trunk (") and '"16.conv' in text
        assert "\n" not in text


def test_mobilenet_cut_checkpoint_round_trip(tmp_path):
    net = build_sppnet("mobilenet_v2_c17", pyramid=(1, 2), fc_dim=8, num_classes=3).eval()
    save_checkpoint(tmp_path / "m.pt", net, {})
    loaded, meta = load_checkpoint(tmp_path / "m.pt", expect_backbone="mobilenet_v2_c17")
    assert meta["backbone"] == "mobilenet_v2_c17" and meta["spec"]["channels"] == 160
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net(x), rtol=0, atol=0)
    with pytest.raises(SppError, match="weights do not fit the mobilenet_v2_c18 trunk"):
        build_backbone("mobilenet_v2_c18", str(tmp_path / "m.pt"))  # a c17 trunk lacks block 17


@pytest.mark.parametrize("name", list(MOBILENET_CUTS))
def test_mobilenet_checkpoint_loads_without_torchvision_into_the_same_network(tmp_path, name):
    # load_checkpoint(random_init=False) (detection) builds MobileNetV2 from nets' own copy of torchvision's module
    # tree, which a checkpoint then fills: the same keys, receptive field and outputs to the bit.
    net = build_sppnet(name, pyramid=(1, 2), fc_dim=8, num_classes=3).eval()
    with torch.no_grad():
        for module in net.modules():  # BatchNorm statistics that are not the identity
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    save_checkpoint(tmp_path / "m.pt", net, {})
    loaded, _ = load_checkpoint(tmp_path / "m.pt", random_init=False)
    blocks = [type(m).__name__ for m in loaded.backbone.body if type(m).__name__ != "Sequential"]
    assert blocks and set(blocks) == {"MobileNetV2Block"}
    assert [(k, tuple(v.shape)) for k, v in loaded.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert loaded.spec == net.spec and receptive_field(loaded.backbone.body) == receptive_field(net.backbone.body)
    x = torch.randn(2, 3, 97, 113)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().conv5(x), net.conv5(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ other trunks


def _stand_in_classifier(factory) -> dict:
    """The classifier keys of a torchvision model as scalars: AlexNet's and VGG's classifiers are 0.2-0.5 GB of
    weights, and the loader keeps only ``features.*`` keys, so their values never matter."""
    with torch.device("meta"):
        keys = [k for k in factory().state_dict() if not k.startswith("features.")]
    assert keys and all(k.startswith("classifier.") for k in keys)
    return {k: torch.zeros(1) for k in keys}


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet18", "resnet50"])
def test_torchvision_trunks_load_a_local_model_file(tmp_path, name):
    import torchvision.models as tvm

    torch.manual_seed(2)
    if name.startswith("resnet"):
        model = getattr(tvm, name)()  # the whole model, layer4 and fc included
        state = model.state_dict()
        trunk = {k: v for k, v in state.items() if k.split(".")[0] not in ("layer4", "fc")}
    else:
        backbone = build_backbone(name)  # random features (the same modules as torchvision's)
        trunk = backbone.body.state_dict()
        state = {f"features.{k}": v for k, v in trunk.items()} | _stand_in_classifier(getattr(tvm, name))
    assert len(trunk) < len(state)
    path = tmp_path / f"{name}_model.pt"
    torch.save(state, path)
    loaded = build_backbone(name, str(path))
    assert loaded.body.state_dict().keys() == trunk.keys()
    assert all(torch.equal(v, trunk[k]) for k, v in loaded.body.state_dict().items())
    if name.startswith("resnet"):  # the same function as torchvision's model up to layer3
        model.eval()
        x = torch.randn(1, 3, 97, 113)
        with torch.no_grad():
            ref = model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))
            torch.testing.assert_close(loaded.eval()(x), ref, rtol=0, atol=0)
    # A file for another trunk is refused in one line naming the file.
    other = {"alexnet": "vgg16", "vgg16": "alexnet", "resnet18": "resnet50", "resnet50": "resnet18"}[name]
    wrong = tmp_path / f"{other}_trunk.pt"
    torch.save(build_backbone(other).body.state_dict(), wrong)
    with pytest.raises(SppError) as err:
        build_backbone(name, str(wrong))
    assert str(err.value).startswith(f"{wrong}: weights do not fit the {name} trunk (")
    assert "\n" not in str(err.value)
