"""detect.fc_compression: Fast R-CNN's truncated SVD of fc6/fc7 and dynamic int8 fc layers (core/fccompress.py),
shared by train-svm, detect and bench; what their results depend on; bench's fc variants side by side."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from stages import bench, detect, train_svm
from stages.core import fccompress, fcfeatures, nets, quant, spp
from stages.core.config import Config, build_config
from stages.core.errors import SppError
from stages.core.fccompress import LowRankLinear


def _linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.bias, 0.0, 0.1)
    return layer


def _head(fc_dim: int = 48, seed: int = 0) -> nets.SppHead:
    """A small head (16 channels x (1 + 4) bins = 80 inputs) with weights wide enough for non-trivial features."""
    torch.manual_seed(seed)
    head = nets.SppHead(16, (1, 2), fc_dim=fc_dim, num_classes=5).eval()
    for layer in (head.fc6, head.fc7):
        nn.init.normal_(layer.weight, 0.0, 0.05)
    return head


def _with(cfg: Config, **detect_settings) -> Config:
    return dataclasses.replace(cfg, detect=dataclasses.replace(cfg.detect, **detect_settings))


# ------------------------------------------------------------------------------------------------ truncated SVD
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])  # out <= in (fc6, fc7) and out > in
def test_svd_factors_at_full_rank_reproduce_the_weights(shape):
    weight = _linear(shape[1], shape[0]).weight.detach().double()
    reduce, expand = fccompress.low_rank_factors(weight, min(shape))
    torch.testing.assert_close(expand @ reduce, weight, rtol=0, atol=1e-12)
    # A rank at or above the smaller side leaves the layer as it is (a copy).
    layer = _linear(shape[1], shape[0])
    kept = fccompress.truncated_svd(layer, min(shape))
    assert type(kept) is nn.Linear and kept is not layer
    assert torch.equal(kept.weight, layer.weight) and torch.equal(kept.bias, layer.bias)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_svd_at_rank_r_is_numpys_truncated_svd(shape):
    """W ~ U_r S_r V_r^T by numpy's SVD in float64; the two layers are S_r V_r^T (no bias) then U_r (the bias)."""
    rank = 7
    layer = _linear(shape[1], shape[0], seed=3)
    weight = layer.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(weight, full_matrices=False)
    truncated = (u[:, :rank] * s[:rank]) @ vt[:rank]
    low = fccompress.truncated_svd(layer, rank)
    assert isinstance(low, LowRankLinear) and low.rank == rank
    assert (low.in_features, low.out_features) == (shape[1], shape[0])
    assert low.reduce.bias is None and torch.equal(low.expand.bias, layer.bias)
    product = (low.expand.weight.double() @ low.reduce.weight.double()).detach().numpy()
    np.testing.assert_allclose(product, truncated, rtol=0, atol=1e-6)
    x = torch.randn(10, shape[1])
    expected = x.double().numpy() @ truncated.T + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(low(x).detach().double().numpy(), expected, rtol=0, atol=1e-5)
    if shape[0] <= shape[1]:  # Fast R-CNN's split: S_r V_r^T then U_r (each singular vector up to its sign)
        signs = np.sign(np.sum(low.expand.weight.detach().double().numpy() * u[:, :rank], axis=0))
        np.testing.assert_allclose(low.expand.weight.detach().numpy() * signs, u[:, :rank], atol=1e-6)
        np.testing.assert_allclose(low.reduce.weight.detach().numpy() * signs[:, None], s[:rank, None] * vt[:rank],
                                   atol=1e-6)


def test_svd_head_compresses_fc6_fc7_only_and_keeps_the_interface():
    head = _head()
    pooled = torch.relu(torch.randn(30, head.in_features))
    small = fccompress.compress_head(head, "svd", (20, 10))
    assert isinstance(small.fc6, LowRankLinear) and isinstance(small.fc7, LowRankLinear)
    assert (small.fc6.rank, small.fc7.rank) == (20, 10) and small.in_features == head.in_features
    assert type(small.fc8) is nn.Linear and torch.equal(small.fc8.weight, head.fc8.weight)
    with torch.inference_mode():
        for layer, width in (("fc6", 48), ("fc7", 48), ("softmax", 5)):
            assert small.features(pooled, layer).shape == (30, width)
        assert small(pooled).shape == (30, 5)
        # fc6 alone: its own truncated SVD, by hand
        fc6 = fccompress.truncated_svd(head.fc6, 20)
        torch.testing.assert_close(small.features(pooled, "fc6"), torch.relu(fc6(pooled)))
    # svd + bfloat16: the compressed layers in bfloat16, close to the float32 svd head
    small16 = fccompress.compress_head(head, "svd", (20, 10), torch.bfloat16)
    assert small16.input_dtype == torch.bfloat16 and small.input_dtype == torch.float32
    with torch.inference_mode():
        exact, fast = small.features(pooled, "fc7"), small16.features(pooled.bfloat16(), "fc7").float()
    assert (fast - exact).abs().max() / exact.abs().max() < 2e-2


def test_bfloat16_batches_are_padded_to_few_shapes_and_rows_keep_their_features(monkeypatch):
    """A bfloat16 head on the CPU sees batches padded to a multiple of BFLOAT16_ROW_MULTIPLE rows (one oneDNN
    kernel per shape, not per image); the rows come back as many as went in, each with its own features."""
    head = _head(fc_dim=64)
    head16 = fccompress.compress_head(head, "none", dtype=torch.bfloat16)
    multiple = fcfeatures.BFLOAT16_ROW_MULTIPLE
    assert fcfeatures.row_multiple(head16, "cpu") == multiple
    assert fcfeatures.row_multiple(head16, "cuda") == 1
    assert fcfeatures.row_multiple(head, "cpu") == 1
    assert fcfeatures.row_multiple(fccompress.compress_head(head, "int8"), "cpu") == 1
    seen = []
    features = head16.features
    monkeypatch.setattr(head16, "features", lambda x, layer: seen.append((len(x), x.dtype)) or features(x, layer))
    pooled = torch.relu(torch.randn(3 * multiple + 5, head.in_features))
    with torch.inference_mode():
        out = fcfeatures.head_rows(head16, pooled, "fc7", batch=2 * multiple)
        alone = torch.cat([features(row[None].bfloat16(), "fc7") for row in pooled[:: multiple // 2]]).float()
        exact = head.features(pooled, "fc7")
    assert seen == [(2 * multiple, torch.bfloat16), (2 * multiple, torch.bfloat16)]  # 2m rows, then m + 5 padded
    assert out.shape == (len(pooled), 64) and out.dtype == torch.float32
    assert torch.allclose(out[:: multiple // 2], alone, rtol=1e-2, atol=1e-3)  # zero rows beside it change nothing
    assert float((out - exact).abs().max() / exact.abs().max()) < 2e-2
    seen.clear()
    with torch.inference_mode():
        fcfeatures.head_rows(head16, pooled[:multiple], "fc7")  # a whole multiple: no copy beyond the conversion
    assert seen == [(multiple, torch.bfloat16)]


# ------------------------------------------------------------------------------------------------ int8
ONEDNN = fccompress.int8_engine() == "onednn"  # AMX: the oneDNN head that takes uint8 rows


@pytest.mark.parametrize("engine", ["chosen", "dynamic"])
def test_int8_head_is_close_to_float32(engine, monkeypatch):
    """The int8 head the CPU gets (oneDNN's where it has AMX, ``quantize_dynamic``'s elsewhere; "dynamic" forces
    the latter) is close to float32, and its layers say they are int8."""
    if engine == "dynamic":
        monkeypatch.setattr(fccompress, "int8_engine", lambda: torch.backends.quantized.engine)
    onednn = ONEDNN and engine == "chosen"
    head = _head(fc_dim=128)
    pooled = torch.relu(torch.randn(256, head.in_features))
    small = fccompress.compress_head(head, "int8")
    assert type(small) is (fccompress.Int8SppHead if onednn else nets.SppHead)
    assert isinstance(small.fc6, fccompress.INT8_LAYERS) and isinstance(small.fc7, fccompress.INT8_LAYERS)
    assert type(small.fc8) is nn.Linear and small.input_dtype == (torch.uint8 if onednn else torch.float32)
    assert fccompress.layer_summary(small)["fc7"] == {"in": 128, "out": 128, "rank": None, "int8": True}
    with torch.inference_mode():
        for layer in ("fc6", "fc7", "softmax"):
            exact, fast = head.features(pooled, layer), small.features(pooled, layer)
            assert fast.dtype == torch.float32 and fast.shape == exact.shape
            relative = float((fast - exact).norm() / exact.norm())
            assert 0 < relative < 2e-2, layer  # 8-bit weights and activations: ~1% here
        assert torch.equal(small.features(pooled, "pool5"), pooled)


def _int8_reference(layer: nn.Linear, rows: quant.QuantizedRows) -> torch.Tensor:
    """relu(x W^T + b) from the quantized integers, in float64: the weights per output channel, symmetric, at
    max |w| / 127.5 (rounded in float32); the input (q - zero_point) * scale."""
    weight = layer.weight.detach()
    scale = weight.abs().amax(1) / 127.5  # in float32, as the layer rounds them
    weight_q = torch.round(weight / scale[:, None]).clamp(-128, 127).double()
    x = (rows.values.double() - rows.zero_point) * rows.scale
    return torch.relu(x @ (weight_q * scale.double()[:, None]).T + layer.bias.detach().double())


@pytest.mark.skipif(not ONEDNN, reason="the oneDNN int8 head is used where the CPU has AMX tiles")
@pytest.mark.parametrize("low", [0.0, -0.7])  # post-ReLU rows (zero point 0), and rows with negatives
def test_onednn_int8_layer_is_the_integer_product_it_stands_for(low):
    layer = _linear(40, 24, seed=5)
    values = torch.rand(33, 40) * (2.0 - low) + low
    rows = quant.quantize_rows(values)
    assert (rows.zero_point == 0) == (low == 0.0)
    int8 = fccompress.Int8LinearReLU(layer)
    with torch.inference_mode():
        out = int8(rows)
        again = int8(values)  # float rows: quantized per batch the same way
        empty = int8(rows[:0])
    reference = _int8_reference(layer, rows)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, again) and empty.shape == (0, 24) and out.dtype == torch.float32


@pytest.mark.skipif(not ONEDNN, reason="the oneDNN int8 head is used where the CPU has AMX tiles")
def test_int8_head_takes_uint8_rows_and_head_rows_hands_each_head_its_kind():
    head = _head(fc_dim=64)
    int8 = fccompress.compress_head(head, "int8")
    pooled = torch.relu(torch.randn(50, head.in_features))
    rows = quant.quantize_rows(pooled)
    with torch.inference_mode():
        from_rows = fcfeatures.head_rows(int8, rows, "fc7", batch=64)
        from_float = fcfeatures.head_rows(int8, pooled, "fc7", batch=64)  # quantized per batch: the same here
        float_head = fcfeatures.head_rows(head, rows, "fc7")  # a float head dequantizes uint8 rows
        batched = fcfeatures.head_rows(int8, rows, "fc6", batch=16)
    assert torch.equal(from_rows, from_float)
    # rows in SPP's bin-major order: the same integer products, the columns only reordered
    bin_major = rows.in_order(spp.yxc_order(16, (1, 2)))
    assert not torch.equal(bin_major.values, rows.values) and torch.equal(bin_major.dequantize(), rows.dequantize())
    copied = copy.deepcopy(int8)  # oneDNN's packed weights shared, the rest copied
    assert copied.fc6.packed is int8.fc6.packed and copied.fc6.weight_scale is not int8.fc6.weight_scale
    with torch.inference_mode():
        assert torch.equal(int8.features(bin_major, "fc7"), from_rows)
        assert torch.equal(int8(bin_major), int8(rows))
        assert torch.equal(copied.features(rows, "softmax"), int8.features(rows, "softmax"))
    torch.testing.assert_close(float_head, head.features(rows.dequantize(), "fc7"))
    torch.testing.assert_close(batched, int8.features(rows, "fc6"))  # the batches share the rows' quantization
    assert fcfeatures.head_features(rows, "pool5", {}).dtype == torch.float32
    nets_by_kind = {"finetuned": type("Net", (), {"head": int8})()}
    assert fcfeatures.takes_quantized_rows("ftfc7", nets_by_kind)
    assert not fcfeatures.takes_quantized_rows("pool5", nets_by_kind)
    assert not fcfeatures.takes_quantized_rows("ftfc7", {"finetuned": type("Net", (), {"head": head})()})


@pytest.mark.skipif(not ONEDNN, reason="the oneDNN int8 head is used where the CPU has AMX tiles")
def test_fc6_hands_fc7_bfloat16_that_quantizes_within_a_step_of_float32():
    head = _head(fc_dim=256)
    int8 = fccompress.compress_head(head, "int8")
    assert int8.hidden_dtype == torch.bfloat16  # oneDNN's int8 engine implies bfloat16 support (AMX)
    assert fccompress.int8_kernels() == "onednn-bf16-hidden"  # what config records hold: the old SVMs rerun
    rows = quant.quantize_rows(torch.relu(torch.randn(300, head.in_features)))
    with torch.inference_mode():
        fc6 = int8.features(rows, "fc6")
        hidden = int8.fc6(rows, torch.bfloat16)
        exact_fc7 = int8.fc7(quant.quantize_rows(fc6))  # what fc7 got from float32 activations
        fc7 = int8.features(rows, "fc7")
    assert fc6.dtype == torch.float32 and hidden.dtype == torch.bfloat16 and fc7.dtype == torch.float32
    torch.testing.assert_close(hidden.float(), fc6, rtol=2 ** -8, atol=0)  # bfloat16's rounding, no more
    via_float, via_bf16 = quant.quantize_rows(fc6), quant.quantize_rows(hidden)
    assert abs(via_bf16.scale / via_float.scale - 1) < 2 ** -8 and via_bf16.zero_point == via_float.zero_point == 0
    steps = (via_bf16.values.int() - via_float.values.int()).abs()
    assert int(steps.max()) <= 2 and float((steps > 0).float().mean()) < 0.2
    torch.testing.assert_close(fc7, exact_fc7, rtol=0, atol=0.01 * float(exact_fc7.abs().max()))  # int8 itself: 1%
    with torch.inference_mode():
        assert torch.equal(fc7, int8.fc7(via_bf16)) and torch.equal(int8(rows), int8.fc8(fc7))
        assert int8.fc6(rows[:0], torch.bfloat16).dtype == torch.bfloat16


def test_int8_engine_is_onednn_only_where_the_cpu_has_amx(monkeypatch):
    default = torch.backends.quantized.engine
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert fccompress.int8_engine() == ("onednn" if "onednn" in torch.backends.quantized.supported_engines
                                        else default)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert fccompress.int8_engine() == default


@pytest.mark.parametrize("engine", sorted({"onednn", "x86", "fbgemm"} & set(torch.backends.quantized.supported_engines)))
def test_int8_layers_packed_for_any_engine_agree_and_leave_the_engine_alone(engine, monkeypatch):
    """Packing for an engine changes no global setting (a packed layer keeps its engine), and every engine
    quantizes alike: their fc7 agree to rounding, each equally close to float32."""
    import torch.ao.quantization as quantization

    packed_for, original = [], quantization.quantize_dynamic
    monkeypatch.setattr(quantization, "quantize_dynamic", lambda *args, **kwargs: packed_for.append(
        torch.backends.quantized.engine) or original(*args, **kwargs))
    head = _head(fc_dim=128)
    pooled = torch.relu(torch.randn(256, head.in_features))
    before = torch.backends.quantized.engine
    packed = fccompress.quantize_int8(head, engine=engine).eval()
    other_engine = next((e for e in ("x86", "fbgemm", "onednn") if e != engine
                         and e in torch.backends.quantized.supported_engines), None)
    if other_engine is None:
        pytest.skip(f"{engine} is this build's only x86/oneDNN engine: nothing to compare it with")
    reference = fccompress.quantize_int8(head, engine=other_engine).eval()
    assert torch.backends.quantized.engine == before and packed_for == [engine, other_engine]
    with torch.inference_mode():
        exact, fast, other = (h.features(pooled, "fc7") for h in (head, packed, reference))
    assert float((fast - exact).norm() / exact.norm()) < 2e-2
    assert float((fast - other).norm() / exact.norm()) < 2e-3  # rounding, not a different scheme


def test_int8_refuses_bfloat16_and_other_devices_in_one_line():
    with pytest.raises(SppError, match="takes float32 input") as err:
        fccompress.compress_head(_head(), "int8", dtype=torch.bfloat16)
    assert "\n" not in str(err.value)
    with pytest.raises(SppError, match="CPU only"):
        fccompress.check_combination("int8", torch.float32, "cuda")
    fccompress.check_combination("svd", torch.bfloat16, "cuda")  # fine
    with pytest.raises(SppError, match="unknown fc compression"):
        fccompress.compress_head(_head(), "fp8")


@pytest.mark.parametrize("compression", ["none", "svd", "int8"])
def test_the_original_head_is_untouched(compression):
    head = _head().train()
    before = {name: tensor.clone() for name, tensor in head.state_dict().items()}
    types = {name: type(module) for name, module in head.named_modules()}
    compressed = fccompress.compress_head(head, compression, (20, 10))
    assert compressed is not head and not compressed.training and head.training
    assert {name: type(module) for name, module in head.named_modules()} == types
    after = head.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ config, records
@pytest.mark.parametrize("overrides, message", [
    ({"detect.fc_compression": "zip"}, "config detect.fc_compression: 'zip' is not one of none, svd, int8"),
    ({"detect.fc_svd_ranks": [0, 4]}, "config detect.fc_svd_ranks: [0, 4] must be positive ranks (fc6, fc7)"),
    ({"detect.fc_svd_ranks": [8]}, "config detect.fc_svd_ranks: expected 2 values"),
    ({"detect.fc_compression": "int8", "detect.fc_dtype": "bfloat16"},
     "config detect.fc_compression: 'int8' takes float32 input, not detect.fc_dtype 'bfloat16'"),
])
def test_config_errors_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(SppError) as err:
        build_config(None, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_config_defaults_and_combinations():
    cfg = Config().detect
    assert (cfg.fc_compression, cfg.fc_svd_ranks) == ("none", (1024, 256))
    assert build_config(None, {"detect.fc_compression": "svd", "detect.fc_dtype": "bfloat16",
                               "detect.fc_svd_ranks": [64, 32]}).detect.fc_svd_ranks == (64, 32)
    assert fccompress.FC_COMPRESSIONS == ("none", "svd", "int8")


def test_what_the_records_hold():
    cfg = Config()
    assert fccompress.compression_record(cfg.detect) == {}
    svd = _with(cfg, fc_compression="svd", fc_svd_ranks=(64, 32))
    assert fccompress.compression_record(svd.detect) == {"fc_compression": "svd", "fc_svd_ranks": [64, 32]}
    assert fccompress.compression_record(svd.detect, uses_fc=False) == {}  # pool5 features
    assert fccompress.compression_record(_with(cfg, fc_compression="int8").detect) == {
        "fc_compression": "int8", "fc_int8_kernels": fccompress.int8_kernels()}
    # Without compression, detect's record is the section as it was recorded before the setting existed.
    # (test_flip too: it is recorded only when on)
    old = {k: v for k, v in cfg.section("detect").items() if k not in ("fc_compression", "fc_svd_ranks", "test_flip")}
    assert fccompress.detect_record(cfg.detect) == old
    assert fccompress.detect_record(_with(cfg, test_flip=True).detect) == old | {"test_flip": True}
    assert fccompress.detect_record(svd.detect) == old | {"fc_compression": "svd", "fc_svd_ranks": [64, 32]}
    # ranks mean nothing without svd: they change no record
    assert fccompress.detect_record(_with(cfg, fc_svd_ranks=(8, 8)).detect) == old


def test_train_svm_and_detect_depend_on_the_setting(tmp_path):
    """SVMs trained on compressed features and detections made with them are other results: the stages rerun,
    with the setting in their config record, and what is downstream goes stale; "none" gives the old record."""
    from test_train_svm import build_tiny_run

    cfg, _ = build_tiny_run(tmp_path, **{"detect.bbox": False})
    svd = _with(cfg, fc_compression="svd", fc_svd_ranks=(8, 4))
    svm0 = train_svm.run(cfg, "ftfc7", one_scale=True)
    det0 = detect.run(cfg, "trainval", "ftfc7", one_scale=True)
    assert "fc_compression" not in svm0.manifest.data["config"]
    assert "fc_compression" not in det0.manifest.data["config"]["detect"]

    # detect with svd on SVMs trained on exact features (Fast R-CNN: no retraining): reruns, same SVM input
    det1 = detect.run(svd, "trainval", "ftfc7", one_scale=True)
    assert not det1.skipped and det1.manifest.fingerprint != det0.manifest.fingerprint
    assert det1.manifest.data["config"]["detect"]["fc_svd_ranks"] == [8, 4]
    assert det1.manifest.data["inputs"]["svm"] == det0.manifest.data["inputs"]["svm"]
    assert detect.run(svd, "trainval", "ftfc7", one_scale=True).skipped

    # train-svm with svd: reruns on the compressed features; detect's SVM input has changed, so it reruns too
    svm1 = train_svm.run(svd, "ftfc7", one_scale=True)
    assert not svm1.skipped and svm1.manifest.fingerprint != svm0.manifest.fingerprint
    assert svm1.manifest.data["config"]["fc_compression"] == "svd" and svm1.manifest.metrics["fc_svd_ranks"] == [8, 4]
    assert "(fc6/fc7 svd)" in svm1.summary
    assert not detect.run(svd, "trainval", "ftfc7", one_scale=True).skipped
    int8 = _with(cfg, fc_compression="int8")
    assert not train_svm.run(int8, "ftfc7", one_scale=True).skipped
    det_int8 = detect.run(int8, "trainval", "ftfc7", one_scale=True)
    assert det_int8.manifest.data["config"]["detect"]["fc_compression"] == "int8"
    assert len(np.load(det_int8.manifest.output("detections"))["score"]) > 0

    # pool5 SVMs use no fc layer: the setting is not theirs
    pool5 = train_svm.run(cfg, "pool5", one_scale=True)
    assert train_svm.run(svd, "pool5", one_scale=True).skipped and "fc_compression" not in pool5.manifest.data["config"]
    # back to exact: the record made before the setting existed
    again = train_svm.run(cfg, "ftfc7", one_scale=True)
    assert not again.skipped and again.manifest.data["config"] == svm0.manifest.data["config"]


def test_scoring_and_train_svm_load_compressed_heads(tmp_path):
    from stages.core import fcfeatures
    from stages.core.artifacts import Run
    from stages.core.scoring import Scorer
    from test_train_svm import build_tiny_run

    cfg, _ = build_tiny_run(tmp_path, **{"detect.bbox": False})
    run = Run(cfg.run_dir)
    exact, _ = fcfeatures.load_feature_nets(run, "ftfc7", cfg, "cpu")
    svd, _ = fcfeatures.load_feature_nets(run, "ftfc7", _with(cfg, fc_compression="svd", fc_svd_ranks=(8, 4)), "cpu")
    int8, _ = fcfeatures.load_feature_nets(run, "ftfc7", _with(cfg, fc_compression="int8"), "cpu")
    assert type(exact["finetuned"].head.fc7) is nn.Linear
    assert svd["finetuned"].head.fc7.rank == 4 and isinstance(int8["finetuned"].head.fc7, fccompress.INT8_LAYERS)
    pooled = torch.relu(torch.randn(40, exact["finetuned"].head.in_features))
    reference = fcfeatures.head_features(pooled, "ftfc7", exact)
    for nets_by_kind, limit in ((svd, 1.0), (int8, 3e-2)):
        features = fcfeatures.head_features(pooled, "ftfc7", nets_by_kind)
        assert features.shape == reference.shape and features.dtype == torch.float32
        assert 0 < float((features - reference).norm() / reference.norm()) < limit
    assert fcfeatures.head_features(pooled[:0], "ftfc7", int8).shape == (0, 32)
    train_svm.run(cfg, "ftfc7", one_scale=True)
    scorer = Scorer(_with(cfg, fc_compression="svd", fc_svd_ranks=(8, 4), fc_dtype="bfloat16"), run, "ftfc7",
                    True, False, torch.device("cpu"))
    head = scorer.nets["finetuned"].head
    assert head.fc6.rank == 8 and head.input_dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ bench
def _bench_cfg(tmp_path, **extra):
    overrides = {"runs_root": str(tmp_path / "runs"), "run": "bench", "data.dataset": "voc2007",
                 "data.voc_root": str(tmp_path / "no_dataset"), "features.scales": [64, 80, 96],
                 "features.one_scale": 80, "model.fc_dim": 64, "device": "cpu"}
    return build_config(None, overrides | extra)


def test_bench_reports_every_fc_variant(tmp_path):
    cfg = _bench_cfg(tmp_path, **{"detect.fc_compression": "svd", "detect.fc_svd_ranks": [16, 8]})
    out = tmp_path / "bench.json"
    text = bench.run(cfg, n_images=2, windows=50, repeats=1, json_out=out, rcnn_windows=8, rcnn_input_size=64,
                     synth_hw=(90, 120), matmul_shape=(128, 128, 128), threads=1, fc_dtype="bfloat16")
    results = json.loads(out.read_text())
    assert (results["fc_compression"], results["fc_svd_ranks"], results["fc_dtype"]) == ("svd", [16, 8], "bfloat16")
    assert results["fc_layers"]["fc6"]["rank"] == 16 and results["fc_layers"]["fc7"]["rank"] == 8
    # every mode ran the selected svd head: its FLOPs per window
    svd_flops = 2 * (12800 * 16 + 16 * 64 + 64 * 8 + 8 * 64)
    spp1 = results["modes"]["spp_1scale"]
    assert spp1["flops"]["fc"] == pytest.approx(spp1["unique_windows"] * svd_flops)
    compared = results["fc_variants"]
    variants = compared["variants"]
    assert set(variants) == {"float32", "bfloat16", "svd", "int8", "svd+bfloat16"}
    assert compared["selected"] == "svd+bfloat16" and compared["windows_per_image"] == 50 and compared["images"] == 2
    exact_flops = 2 * (12800 * 64 + 64 * 64)
    for name, data in variants.items():
        assert data["seconds"] > 0 and data["speedup"] > 0, name
        assert data["flops_per_window"] == pytest.approx(svd_flops if name.startswith("svd") else exact_flops), name
        assert 0 <= data["top1_agreement"] <= 1
    reference = variants["float32"]
    assert reference["speedup"] == 1.0 and reference["fc7_max_rel_diff"] == reference["score_max_rel_diff"] == 0.0
    assert 0 < variants["bfloat16"]["fc7_max_rel_diff"] < 2e-2
    assert 0 < variants["int8"]["fc7_mean_rel_diff"] < 5e-2 and variants["int8"]["layers"]["fc6"]["int8"]
    assert variants["svd"]["fc7_mean_rel_diff"] > variants["int8"]["fc7_mean_rel_diff"]  # rank 8 of 64: far
    assert "fc6+fc7 variants" in text and "svd+bfloat16 *" in text and "truncated SVD (ranks fc6/fc7 16/8)" in text
    # Each variant's total is conv + the pooling of its own rows + its fc; the int8 head's rows are uint8 where it
    # takes them (pooled a second time, timed apart), every other variant's the selected float32 pooling.
    for mode in ("spp_1scale", "spp_5scale", "rcnn"):
        data = results["modes"][mode]
        for name, variant in data["fc_variants"].items():
            assert variant["total_seconds"] == pytest.approx(
                data["seconds"]["conv"] + variant["pool_seconds"] + variant["fc_seconds"], rel=1e-9), (mode, name)
            if name != "int8" or not ONEDNN or mode == "rcnn":
                assert variant["pool_seconds"] == pytest.approx(data["seconds"]["pool"], rel=1e-9), (mode, name)


@pytest.mark.skipif(not ONEDNN, reason="the oneDNN int8 head (uint8 rows) is used where the CPU has AMX tiles")
def test_bench_with_int8_selected_pools_uint8_rows_for_it(tmp_path, monkeypatch):
    from stages.bench import spp_mode

    quantized_calls = []
    original = spp_mode.pool_image_windows
    monkeypatch.setattr(spp_mode, "pool_image_windows", lambda *a, **k: quantized_calls.append(
        k.get("quantized", a[5] if len(a) > 5 else False)) or original(*a, **k))
    out = tmp_path / "bench.json"
    bench.run(_bench_cfg(tmp_path, **{"detect.fc_compression": "int8"}), n_images=1, windows=30, repeats=1,
              json_out=out, rcnn_windows=4, rcnn_input_size=64, synth_hw=(90, 120), matmul_shape=(64, 64, 64),
              threads=1)
    results = json.loads(out.read_text())
    assert results["fc_variants"]["selected"] == "int8" and results["fc_layers"]["fc6"]["int8"]
    assert True in quantized_calls and False in quantized_calls  # uint8 rows for int8, float32 for the others
    for mode in ("spp_1scale", "spp_5scale"):
        data = results["modes"][mode]
        assert data["seconds"]["pool"] == pytest.approx(data["fc_variants"]["int8"]["pool_seconds"], rel=1e-9)
        assert data["fc_variants"]["float32"]["pool_seconds"] > 0
    assert 0 < results["fc_variants"]["variants"]["int8"]["fc7_mean_rel_diff"] < 5e-2


def test_bench_refuses_int8_in_bfloat16_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "bench_inputs", lambda *a, **k: pytest.fail("inputs made before the check"))
    with pytest.raises(SppError, match="int8"):
        bench.run(_bench_cfg(tmp_path, **{"detect.fc_compression": "int8"}), n_images=1, windows=5, repeats=1,
                  fc_dtype="bfloat16")


def test_the_cli_options_reach_bench_train_svm_and_detect(monkeypatch, tmp_path):
    from sppcli.cli import cli

    seen = {}
    monkeypatch.setattr(bench, "run", lambda cfg, **kwargs: seen.update(cfg=cfg) or "report")
    result = CliRunner().invoke(cli, ["bench", "--runs-root", str(tmp_path), "--fc-compression", "svd",
                                      "--fc-svd-ranks", "512,128"])
    assert result.exit_code == 0, result.output
    assert (seen["cfg"].detect.fc_compression, seen["cfg"].detect.fc_svd_ranks) == ("svd", (512, 128))
    bad = CliRunner().invoke(cli, ["bench", "--runs-root", str(tmp_path), "--fc-svd-ranks", "512"])
    assert bad.exit_code == 2 and "expected two ranks FC6,FC7" in bad.output
    bad = CliRunner().invoke(cli, ["bench", "--runs-root", str(tmp_path), "--fc-svd-ranks", "0,4"])
    assert bad.exit_code == 1 and "config detect.fc_svd_ranks: [0, 4] must be positive" in bad.output
    for command in ("train-svm", "detect", "bench"):
        text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
        assert "--fc-compression [none|svd|int8]" in text and "--fc-svd-ranks FC6,FC7" in text, command
