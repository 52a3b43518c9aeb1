"""The quantization building blocks: grid, BN folding, AdaRound's rounding, QDQ parity with ONNX Runtime."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compress.quant import ActQuant, build, make_plan
from compress.quant.adaround import AdaRoundSettings, h_of_v, hard_round, init_v, optimize_layer, set_rtn
from compress.quant.calibrate import calibrate_activations
from compress.quant.graph import act_quantizers, quant_layers, set_float
from compress.quant.grid import quantize_weight, weight_qmax, weight_qrange, weight_scales


class Block(nn.Module):
    """Conv-BN-ReLU stem, a residual block with a projection shortcut, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        identity = self.shortcut(x)
        out = self.bn2(self.conv2(x)) + identity
        return self.fc(torch.flatten(self.pool(self.relu2(out)), 1))


def _trained_like(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    model = Block()
    for m in model.modules():  # non-trivial BN statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _plan(model: nn.Module, bits: int = 4, act: int | None = 8, **kw) -> dict:
    return make_plan(model, weight_bits=bits, activation_bits=act, layer_bits=kw.get("layer_bits", {}),
                     skip=kw.get("skip", []), first_last_8bit=kw.get("first_last_8bit", False))


def test_grid_scales_and_rounding() -> None:
    # seeded, and channels enough that some at low bits gain from a wider range (6 unseeded channels
    # gave none at some width on a 16-core machine with torch 2.11)
    w = torch.randn(64, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    for bits in range(2, 9):
        qmax = weight_qmax(bits)
        for method in ("mse", "sqnr", "minmax"):
            s = weight_scales(w, bits, method)
            q = quantize_weight(w, s, bits)
            assert q.abs().max() <= qmax and torch.equal(q, q.round())
        minmax = weight_scales(w, bits, "minmax")
        assert torch.allclose(minmax * qmax, w.abs().flatten(1).amax(1))
        assert (weight_scales(w, bits, "mse") <= minmax + 1e-9).all()  # MSE only ever shrinks the range
        # clipping weighted 3x moves no channel's range below the plain-MSE one, and at low bits widens some
        sqnr, mse = weight_scales(w, bits, "sqnr"), weight_scales(w, bits, "mse")
        assert (sqnr >= mse - 1e-9).all() and (sqnr <= minmax + 1e-9).all()
        if bits <= 4:
            assert (sqnr > mse).any(), bits
        assert torch.equal(weight_scales(w, bits, "auto"), sqnr if bits == 2 else mse)  # the pass's default
    assert weight_qmax(3) == 3  # the narrow symmetric grid: -3..3 at 3 bits


def test_folded_model_equals_unfolded_in_float() -> None:
    model = _trained_like()
    x = torch.randn(4, 3, 12, 12)
    plan = _plan(model)
    assert plan["folded"] == {"conv1": "bn1", "conv2": "bn2", "shortcut.0": "shortcut.1"}
    q = build(model, plan)
    set_float(q, True)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the caller's model was modified"


def test_quantizer_placement_follows_tensorrt() -> None:
    model = _trained_like()
    plan = _plan(model)
    sources = {a["source"]: [c for c, _ in a["consumers"]] for a in plan["activations"]}
    # inputs of every conv/linear, shared where one tensor feeds two convs
    assert sorted(sources["x"]) == ["conv1"]
    assert sorted(sources["relu1"]) == ["conv2", "shortcut_0"]
    assert sources["flatten"] == ["fc"]
    # the residual add: the shortcut conv's output (the skip) is quantized, conv2's output (fused) is not
    assert sources["shortcut_0"] == ["add"]
    assert "conv2" not in sources
    skipped = _plan(model, skip=["fc"])
    assert "flatten" not in {a["source"] for a in skipped["activations"]} and skipped["float_layers"] == ["fc"]
    bits = _plan(model, bits=3, first_last_8bit=True, layer_bits={"conv2": 5})["bits"]
    assert bits == {"conv1": 8, "shortcut.0": 3, "conv2": 5, "fc": 8}


def test_h_of_v_init_reproduces_fractional_part() -> None:
    w_over_s = torch.randn(1000) * 5
    frac = w_over_s - torch.floor(w_over_s)
    torch.testing.assert_close(h_of_v(init_v(w_over_s)), frac, atol=1e-5, rtol=0)


def _layer_setup(bits: int = 3):
    model = _trained_like()
    q = build(model, _plan(model, bits=bits, act=None))
    layer = quant_layers(q)["conv2"]
    layer.weight_scale.copy_(weight_scales(layer.float_weight, bits, "mse"))
    set_rtn(layer, None)
    x = torch.relu(torch.randn(64, 8, 8, 8))
    with torch.no_grad():
        y = layer.functional(x, layer.float_weight)
    return layer, x, y


def test_hard_rounding_is_on_the_grid_within_one_step() -> None:
    layer, x, y = _layer_setup(bits=3)
    optimize_layer(layer, x, y, lambda t: t, AdaRoundSettings(iterations=40, batch_size=16), None,
                   torch.Generator().manual_seed(0))
    qmax = weight_qmax(3)
    ints = layer.weight_int.float()
    assert layer.weight_int.dtype == torch.int8 and ints.abs().max() <= qmax
    s = layer.weight_scale.view(-1, 1, 1, 1)
    clipped = torch.clamp(layer.float_weight / s, -qmax, qmax)  # a clipped weight's nearest value is the edge
    assert ((ints - clipped).abs() <= 1 + 1e-5).all()


def test_zero_iterations_equals_round_to_nearest() -> None:
    layer, x, y = _layer_setup(bits=4)
    rtn = layer.weight_int.clone()
    optimize_layer(layer, x, y, lambda t: t, AdaRoundSettings(iterations=0), None, torch.Generator())
    assert torch.equal(layer.weight_int, rtn)


def test_masked_weights_stay_zero() -> None:
    layer, x, y = _layer_setup(bits=2)
    mask = torch.rand_like(layer.float_weight) > 0.5
    layer.float_weight.mul_(mask)
    set_rtn(layer, mask.float())
    # a large learning rate would flip masked weights' rounding up if the mask did not hold them
    optimize_layer(layer, x, y, lambda t: t, AdaRoundSettings(iterations=30, lr=1.0, batch_size=16),
                   mask.float(), torch.Generator().manual_seed(0))
    assert (layer.weight_int[~mask] == 0).all()
    v = torch.full((3,), 5.0)
    assert torch.equal(hard_round(torch.zeros(3), v, 1, torch.tensor([1.0, 0.0, 1.0])), torch.tensor([1.0, 0.0, 1.0]))



def test_full_grid_has_one_more_negative_level() -> None:
    assert weight_qrange(2, "narrow") == (-1, 1) and weight_qrange(2, "full") == (-2, 1)
    assert weight_qrange(8, "full") == (-128, 127)  # still int8: export folds these into int8 initializers
    w = torch.randn(16, 8, 3, 3)
    for bits in (2, 3, 4):
        narrow = weight_scales(w, bits, "mse", grid="narrow")
        full = weight_scales(w, bits, "mse", grid="full")
        q = quantize_weight(w, full, bits, "full")
        assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
        # the full grid contains the narrow one: its MSE-chosen scales never quantize worse
        def err(scale: torch.Tensor, grid: str) -> torch.Tensor:
            return (w - quantize_weight(w, scale, bits, grid) * scale.view(-1, 1, 1, 1)).pow(2).flatten(1).sum(1)
        assert (err(full, "full") <= err(narrow, "narrow") + 1e-6).all()
    # min-max with the full grid: the same scales and integers as narrow (the extra level lies beyond -max)
    minmax = weight_scales(w, 3, "minmax", grid="full")
    assert torch.equal(minmax, weight_scales(w, 3, "minmax")) and torch.equal(
        quantize_weight(w, minmax, 3, "full"), quantize_weight(w, minmax, 3))


def test_adaround_on_the_full_grid() -> None:
    layer, x, y = _layer_setup(bits=2)
    layer.weight_scale.copy_(weight_scales(layer.float_weight, 2, "mse", grid="full"))
    set_rtn(layer, None, "full")
    rtn = layer.weight_int.clone()
    assert rtn.min() == -2  # the MSE range uses the extra level
    optimize_layer(layer, x, y, lambda t: t, AdaRoundSettings(iterations=0, weight_grid="full"), None, torch.Generator())
    assert torch.equal(layer.weight_int, rtn)  # zero iterations: round-to-nearest on the same grid
    optimize_layer(layer, x, y, lambda t: t, AdaRoundSettings(iterations=40, batch_size=16, weight_grid="full"),
                   None, torch.Generator().manual_seed(0))
    ints = layer.weight_int.float()
    assert ints.min() >= -2 and ints.max() <= 1
    clipped = torch.clamp(layer.float_weight / layer.weight_scale.view(-1, 1, 1, 1), -2, 1)
    assert ((ints - clipped).abs() <= 1 + 1e-5).all()
    # the QuantLayer computes with exactly these integers (its fake-quant range is int8's [-128, 127])
    torch.testing.assert_close(layer(x), layer.functional(x, ints * layer.weight_scale.view(-1, 1, 1, 1)))


def test_thread_choice_keeps_the_result() -> None:
    from compress.quant.adaround import ThreadChooser

    before = torch.get_num_threads()
    results = []
    for threads in (1, None):
        layer, x, y = _layer_setup(bits=3)
        chooser = ThreadChooser(threads, torch.device("cpu"))
        optimize_layer(layer, x, y, lambda t: t, AdaRoundSettings(iterations=30, batch_size=16), None,
                       torch.Generator().manual_seed(0), threads=chooser)
        chooser.restore()
        results.append(layer.weight_int.clone())
    assert torch.get_num_threads() == before
    # the thread count changes float summation order only: (almost) the same rounding decisions
    assert (results[0] != results[1]).float().mean() < 0.02


def _quantized(model: nn.Module, bits: int = 4, act: int | None = 8) -> tuple[nn.Module, dict]:
    plan = _plan(model, bits=bits, act=act)
    q = build(model, plan)
    for layer in quant_layers(q).values():
        layer.weight_scale.copy_(weight_scales(layer.float_weight, layer.bits, "mse"))
        set_rtn(layer, None)
    calibrate_activations(q, torch.randn(64, 3, 12, 12), "mse")
    for layer in quant_layers(q).values():
        layer.drop_float_weight()
    return q, plan


def test_checkpoint_restores_the_same_quantized_model() -> None:
    from compress.state import ModelState

    model = _trained_like()
    q, plan = _quantized(model)
    payload = ModelState(q, {}, plan).checkpoint()
    buffer = __import__("io").BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["state_dict"]["conv1.weight_int"].dtype == torch.int8
    restored = ModelState.from_checkpoint(_trained_like(seed=5), loaded)
    assert restored.quant == plan
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(restored.model(x), q(x))


def test_fake_quant_matches_onnx_runtime_qdq(tmp_path: Path) -> None:
    import onnx

    import onnxruntime as ort

    from export.lint import lint_onnx
    from export.onnx_export import export_onnx
    from export.ort_runner import ort_session, predict

    model = _trained_like()
    q, _ = _quantized(copy.deepcopy(model))
    path = export_onnx(q, torch.randn(1, 3, 12, 12), tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # one Q/DQ pair per quantized activation tensor, one per weight
    assert ops.count("QuantizeLinear") == len(act_quantizers(q)) + len(quant_layers(q))
    assert ops.count("DequantizeLinear") == ops.count("QuantizeLinear")
    x = torch.randn(200, 3, 12, 12)
    with torch.no_grad():
        expected = q(x).numpy()
    # ONNX Runtime's reference kernels: the same ops on the same floats, up to accumulation order
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    got = predict(reference, x.numpy())
    assert np.abs(got - expected).max() < 1e-4
    # fused int8 kernels (QLinearConv: int32 bias, fixed-point requantization) differ by a rounding step
    # here and there; the prediction does not
    fused = predict(ort_session(path), x.numpy())
    assert (fused.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert lint_onnx(path) == []


def test_act_quant_is_onnx_quantize_linear(tmp_path: Path) -> None:
    from export.onnx_export import export_onnx
    from export.ort_runner import ort_session, predict

    quantizer = ActQuant(8)
    quantizer.scale.fill_(0.25)  # a power of two: x / scale is exact, so ties are real ties
    steps = torch.arange(-280, 280, dtype=torch.float32) * 0.5  # every half step, beyond saturation
    x = (steps * 0.25).view(1, -1)
    path = export_onnx(quantizer, x, tmp_path / "act.onnx")
    got = predict(ort_session(path), x.numpy())
    expected = quantizer(x).numpy()
    assert np.array_equal(got, expected)
    assert expected[0, steps.tolist().index(2.5)] == 0.5  # round half to even, as QuantizeLinear does
    assert expected.min() == -128 * 0.25 and expected.max() == 127 * 0.25


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_activation_calibration(method: str) -> None:
    model = _trained_like()
    q = build(model, _plan(model))
    amax = calibrate_activations(q, torch.randn(32, 3, 12, 12), method)
    assert set(amax) == set(act_quantizers(q)) and all(v > 0 for v in amax.values())
    for name, quantizer in act_quantizers(q).items():
        assert float(quantizer.scale) == pytest.approx(amax[name] / 127, rel=1e-6)


def test_unsigned_act_quant_is_onnx_quantize_linear_with_its_zero_point(tmp_path: Path) -> None:
    from export.onnx_export import export_onnx
    from export.ort_runner import ort_session, predict

    quantizer = ActQuant(8)
    quantizer.set_amax(255 * 0.25, unsigned=True)
    assert float(quantizer.scale) == 0.25 and int(quantizer.zero_point) == -128
    steps = torch.arange(-20, 540, dtype=torch.float32) * 0.5
    x = (steps * 0.25).view(1, -1)
    path = export_onnx(quantizer, x, tmp_path / "act.onnx")
    assert np.array_equal(predict(ort_session(path), x.numpy()), quantizer(x).numpy())
    expected = quantizer(x).numpy()
    assert expected.min() == 0 and expected.max() == 255 * 0.25  # 256 levels on [0, amax]
    # the zero point survives a checkpoint round trip, and an old checkpoint without one loads as symmetric
    loaded = ActQuant(8)
    loaded.load_state_dict(quantizer.state_dict())
    assert loaded.unsigned and torch.equal(loaded(x), quantizer(x))
    old = {k: v for k, v in quantizer.state_dict().items() if k != "zero_point"}
    loaded.load_state_dict(old)
    assert not loaded.unsigned


def test_unsigned_symmetric_calibration_only_for_nonnegative_tensors() -> None:
    model = _trained_like()
    inputs = torch.randn(32, 3, 12, 12)  # the network input has negatives: it stays symmetric
    q = build(model, _plan(model))
    amax = calibrate_activations(q, inputs, "mse", unsigned_symmetric=True)
    quantizers = act_quantizers(q)
    unsigned = {name for name, quantizer in quantizers.items() if quantizer.unsigned}
    assert unsigned and unsigned != set(quantizers)
    with torch.no_grad():
        for name, quantizer in quantizers.items():
            levels = 255 if name in unsigned else 127
            assert float(quantizer.scale) == pytest.approx(amax[name] / levels, rel=1e-6)
    signed = build(model, _plan(model))
    calibrate_activations(signed, inputs, "mse")
    assert not any(quantizer.unsigned for quantizer in act_quantizers(signed).values())
    # same range, twice the levels: the unsigned step is 127/255 of the symmetric one
    signed_quantizers = act_quantizers(signed)
    for name in unsigned:
        assert float(quantizers[name].scale) < 0.6 * float(signed_quantizers[name].scale)


def test_bias_correction_removes_the_mean_output_shift_of_rounding() -> None:
    from compress.quant.adaround import correct_bias
    from compress.quant.modules import QuantLayer

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, bias=True)
    layer = QuantLayer(conv, bits=2)
    layer.weight_scale.copy_(weight_scales(layer.float_weight, 2, "mse", grid="full"))
    set_rtn(layer, None, "full")
    x = torch.rand(64, 4, 8, 8)  # nonnegative, like post-ReLU inputs: rounding shifts the mean output
    with torch.no_grad():
        y_float = conv(x)

    def shift() -> torch.Tensor:
        with torch.no_grad():
            return (y_float - layer(x)).mean(dim=(0, 2, 3)).abs()

    before = shift()
    assert before.max() > 1e-2
    correct_bias(layer, x, y_float)
    assert shift().max() < 1e-5 < before.max()
