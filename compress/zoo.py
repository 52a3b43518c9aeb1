"""The whole pipeline on one model, step by step, each step's outcome recorded: the model zoo matrix.

Steps (each on the previous step's model, through the registered passes, on random images in classes or
random token sequences, see random_data):
  build      the model (compress.models.build_model: attention made explicit), random weights
  prune-ch   prune.magnitude granularity channels (Torch-Pruning; attention heads as whole groups;
             GPT-2's Conv1D blocks by compress.conv1d_channels), then the stage checkpoint reloads into a
             freshly built model with identical outputs
  prune-un   prune.magnitude unstructured on top (masks held from here on)
  distill    a short distill.dot from the unpruned model
  quantize   an image classifier's output layer refitted to the pruned model's features (class_head),
             then a short quantize.adaround (W7A8, see Settings); the stage checkpoint reloads exactly
  export     the quantized model's Q/DQ ONNX (export.onnx_export), turned into int8-trt (export.qdq)
  lint       export.lint.lint_onnx finds nothing
  parity     ONNX Runtime on the int8 file against the torch quantized model: top-1 agreement >= 0.99
             (of the class per image, or of the next token per position of a language model)

A row names its samples (images of a size, or token ids of a length from a vocabulary) and the output
the metrics read (ZooModel.output: `logits` of a transformers ModelOutput), so Hugging Face models built
from small configs (hf_vit, gpt2) run the same steps as the torchvision ones.

A step that raises is recorded with its error (compress.attention.UnsupportedLayer and the passes name
the module and the reason), and the steps that need its result are skipped. `bench/zoo.py` prints the
table; tests/test_zoo.py runs the matrix.
"""
from __future__ import annotations

import copy
import io
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress.batches import Nested, call_model, selected
from compress.channels import head_counts
from compress.data import DataSplits
from compress.models import build_model
from compress.passes.registry import get_pass
from compress.quant.graph import oriented_masks
from compress.recipe import ModelConfig
from compress.sparsity import output_layer_name
from compress.state import ModelState, StageContext
from compress.train import recalibrate_batchnorm

STEPS = ("build", "prune-ch", "prune-un", "distill", "quantize", "export", "lint", "parity")
MIN_AGREEMENT = 0.99


@dataclass(frozen=True)
class ZooModel:
    name: str
    arch: str
    size: int = 32  # images: height and width
    kwargs: dict[str, Any] = field(default_factory=dict)
    sample: Literal["image", "tokens"] = "image"  # what the model takes: [3, size, size] or `length` ids
    length: int = 16  # tokens: ids per sequence
    vocab: int = 0  # tokens: ids drawn from [0, vocab)
    output: str | None = None  # model.output: the part of the outputs the metrics read (None: all, one tensor)


# The list: torchvision classifiers with random weights at small inputs, and a plain
# nn.TransformerEncoder classifier (builtin:transformer).
ZOO: tuple[ZooModel, ...] = (
    ZooModel("resnet18", "torchvision:resnet18"),
    ZooModel("resnet50", "torchvision:resnet50"),
    ZooModel("mobilenet_v2", "torchvision:mobilenet_v2"),
    ZooModel("mobilenet_v3_small", "torchvision:mobilenet_v3_small"),
    ZooModel("efficientnet_b0", "torchvision:efficientnet_b0"),
    ZooModel("regnet_x_400mf", "torchvision:regnet_x_400mf"),
    ZooModel("shufflenet_v2_x1_0", "torchvision:shufflenet_v2_x1_0"),
    ZooModel("squeezenet1_1", "torchvision:squeezenet1_1", size=64),
    ZooModel("convnext_tiny", "torchvision:convnext_tiny"),
    ZooModel("vit_b_16", "torchvision:vit_b_16", kwargs={"image_size": 32}),
    ZooModel("swin_t", "torchvision:swin_t", size=64),
    ZooModel("transformer", "builtin:transformer"),
    # transformers' own classes, unmodified, from small configs (issue 19)
    ZooModel("hf_vit", "python:compress.zoo:hf_vit", kwargs={"num_classes": 10}, output="logits"),
    ZooModel("gpt2", "python:compress.zoo:gpt2", sample="tokens", length=16, vocab=128, output="logits"),
)


# Small versions of the two torchvision transformers (same classes, so the same code paths), for the
# default test run: python:compress.zoo:tiny_vit and python:compress.zoo:tiny_swin
def tiny_vit(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=image_size, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=num_classes,
    )


def tiny_swin(num_classes: int = 10) -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=num_classes
    )


def hf_vit(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """transformers' ViTForImageClassification, random weights: pixel_values in, a ModelOutput's logits out."""
    import transformers

    config = transformers.ViTConfig(
        image_size=image_size, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=num_classes,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config).eval()


def gpt2(vocab_size: int = 128, positions: int = 32) -> nn.Module:
    """transformers' GPT2LMHeadModel, random weights: token ids in, logits [B, L, vocab] out (Conv1D layers,
    causal attention, lm_head tied to the word embedding).

    use_cache stays True, as from_pretrained gives it (the key/value cache is no tensor: the metrics read
    `logits`, the ONNX file has that one output). With use_cache=False and no attention mask, transformers
    looks for packed sequences in the position ids with torch.diff, which the ONNX export cannot convert
    ("Exporting the operator 'aten::diff' to ONNX opset version 17 is not supported").
    """
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=positions, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


TINY: tuple[ZooModel, ...] = (
    ZooModel("tiny_vit", "python:compress.zoo:tiny_vit", kwargs={"num_classes": 10}),
    ZooModel("tiny_swin", "python:compress.zoo:tiny_swin", kwargs={"num_classes": 10}),
    ZooModel("transformer", "builtin:transformer"),
    *(z for z in ZOO if z.name in ("hf_vit", "gpt2")),  # already small
)


@dataclass
class Settings:
    """Small on purpose: the matrix checks that everything runs and agrees, not accuracy."""

    train_samples: int = 16
    val_samples: int = 8  # what the passes' own evaluations use
    parity_samples: int = 200  # random inputs the int8 ONNX and the torch quantized model are compared on
    num_classes: int = 10
    batch_size: int = 16
    channel_sparsity: float = 0.25  # of channels, and of attention heads
    sparsity: float = 0.5
    distill_epochs: int = 1
    # 7-bit weights: ONNX Runtime's x86 int8 kernels without VNNI (AVX2, AVX-512F) add pairs of u8 x s8
    # products in int16, which saturates with full-range 8-bit weights (ORT's reduce_range advice); the
    # graph itself matches torch exactly at any width (ORT with graph optimizations off)
    weight_bits: int = 7
    iterations: int = 2
    # the whole train split: with 8, efficientnet_b0's ranges came from inputs whose deep activations barely
    # vary, and its quantized model predicted 2 classes of 10 (16: 5)
    calibration_samples: int = 16
    latency_runs: int = 5
    class_noise: float = 0.5  # random_data: per-pixel noise around the class prototypes (unit variance)
    seed: int = 0


@dataclass
class StepResult:
    status: str = "skip"  # ok | fail | skip
    seconds: float = 0.0
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ZooResult:
    model: str
    steps: dict[str, StepResult] = field(default_factory=lambda: {s: StepResult() for s in STEPS})
    parity: dict[str, float] = field(default_factory=dict)
    size_ratio: float | None = None  # int8-trt ONNX bytes / fp32 ONNX bytes of the unpruned model
    latency_ratio: float | None = None  # int8-trt / fp32 ONNX Runtime batch-1 median latency
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention path -> [heads before, after]

    @property
    def passed(self) -> bool:
        return all(step.status == "ok" for step in self.steps.values())

    def first_error(self) -> str:
        failed = next(((name, s) for name, s in self.steps.items() if s.status == "fail"), None)
        return f"{failed[0]}: {failed[1].error}" if failed else ""


def prototypes(zoo: ZooModel, settings: Settings) -> torch.Tensor:
    """One random image per class: the centres the random data is drawn around (see random_data)."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    return torch.randn(settings.num_classes, 3, zoo.size, zoo.size, generator=generator)


def random_data(zoo: ZooModel, settings: Settings) -> DataSplits:
    """Random images in classes: each sample its class's prototype plus noise (settings.class_noise); for a
    model of token ids, random sequences with the next token of each position as its target.

    Not i.i.d. noise: on such inputs a random network's features are isotropic (vit_b_16: the top ten
    principal spreads of the 768 head features within 4.3-3.4), so no 10-way head has top-1 margins
    above the noise that float32 rounding alone puts into a deep int8 network (one rounding flip in an
    activation quantizer spreads, layer by layer, to most elements: the same torch quantized vit_b_16 in
    float32 and in float64 agrees on 0.97 of top-1). Classes give the features a signal, as real data
    gives a trained model, and the head (class_head) reads it.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    if zoo.sample == "tokens":
        return _random_tokens(zoo, settings, generator)
    centres = prototypes(zoo, settings)

    def split(n: int) -> TensorDataset:
        y = torch.randint(0, settings.num_classes, (n,), generator=generator)
        x = centres[y] + settings.class_noise * torch.randn(n, 3, zoo.size, zoo.size, generator=generator)
        return TensorDataset(x, y)

    return DataSplits(
        split(settings.train_samples),
        split(settings.val_samples),
        split(settings.parity_samples),
        settings.num_classes,
        (3, zoo.size, zoo.size),
        f"random-{zoo.size}px",
    )


def _random_tokens(zoo: ZooModel, settings: Settings, generator: torch.Generator) -> DataSplits:
    """Sequences of `zoo.length` ids uniform in [0, vocab), each position's target the id after it (a language
    model's task; the metrics read the class scores on the last axis of [N, L, vocab])."""
    if zoo.vocab < 2:
        raise ValueError(f"zoo model {zoo.name}: token samples need a vocab of at least 2, got {zoo.vocab}")

    def split(n: int) -> TensorDataset:
        ids = torch.randint(0, zoo.vocab, (n, zoo.length + 1), generator=generator)
        return TensorDataset(ids[:, :-1], ids[:, 1:])

    return DataSplits(
        split(settings.train_samples),
        split(settings.val_samples),
        split(settings.parity_samples),
        None,
        None,
        f"random-tokens-{zoo.length}x{zoo.vocab}",
        targets="other",
        split="random",
    )


def build(zoo: ZooModel, settings: Settings, data: DataSplits | None = None) -> nn.Module:
    """The model with random weights; with `data`, BatchNorm statistics measured on its training inputs
    and an image classifier's output layer set by class_head (principal_head where class_head cannot fit
    it). A language model's head stays as built (GPT-2's is the word embedding, tied)."""
    torch.manual_seed(settings.seed)
    images = zoo.sample == "image"
    model = build_model(
        ModelConfig(arch=zoo.arch, kwargs=zoo.kwargs),
        in_channels=3 if images else None,
        num_classes=settings.num_classes if images else None,
        input_size=zoo.size if images else None,
    ).eval()
    if data is not None and images:
        inputs = data.train.tensors[0]
        batchnorm_statistics(model, inputs)
        if not class_head(model, prototypes(zoo, settings)):
            principal_head(model, inputs)
    return model


def batchnorm_statistics(model: nn.Module, inputs: torch.Tensor) -> None:
    """BatchNorm running statistics measured on `inputs` (as a trained model has them), in place of the
    initial mean 0 / variance 1: with those, activations of some random networks vanish layer by layer
    (EfficientNet-B0 at 32 px ends near 1e-14), which no int8 grid can represent."""
    recalibrate_batchnorm(model, TensorDataset(inputs, torch.zeros(len(inputs))), batch_size=16)


def _output_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    name = output_layer_name(model, example)
    if name is None:
        raise ValueError(f"{type(model).__name__} runs no Conv/Linear layer")
    return model.get_submodule(name)


def _output_inputs(model: nn.Module, output: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = output.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        model(inputs)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def class_head(model: nn.Module, centres: torch.Tensor) -> bool:
    """The output layer set to the nearest-class-mean classifier of the model's own features:
    logit_c = (|f - m|^2 - |f - m_c|^2) / (2 s), with m_c the features of class c's prototype, m their mean
    and s the mean |m_c - m|^2 (a sample at its class centre leads by about 1). The output layer is a
    Linear on [batch, features], or a 1x1 convolution whose outputs the model averages over positions
    (SqueezeNet: Conv2d, ReLU, global average pool): there the features are its inputs averaged over
    positions, and every bias is raised by one constant so that no position's output on the prototypes
    is negative (a ReLU after it then passes them, and the pooled logits are the classifier's plus that
    constant: the same ranking). False (nothing changed) for any other output layer.

    Set when the model is built and again on the pruned model before quantization: channel pruning
    replaces much of a random network's function (a random vit_b_16's logit spread fell from 1 to 0.18),
    and a head fitted to other features has near-tied logits again.
    """
    output = _output_layer(model, centres[:1])
    conv = isinstance(output, nn.Conv2d) and output.kernel_size == (1, 1) and output.groups == 1
    if not (isinstance(output, nn.Linear) or conv) or output.bias is None or output.weight.shape[0] != len(centres):
        return False
    seen = _output_inputs(model, output, centres).double()
    if seen.dim() != (4 if conv else 2) or (conv and model(centres[:1]).shape != (1, len(centres))):
        return False  # conv: only where the model pools its outputs into [batch, classes]
    features = seen.mean(dim=(2, 3)) if conv else seen
    mean = features.mean(dim=0)
    delta = features - mean
    size = float(delta.pow(2).sum(dim=1).mean())
    if size <= 0.0:
        return False
    weight = delta / size
    bias = -weight @ mean - delta.pow(2).sum(dim=1) / (2 * size)
    if conv:
        at_positions = torch.einsum("nchw,kc->nkhw", seen, weight) + bias[:, None, None]
        low, high = float(at_positions.min()), float(at_positions.max())
        bias += max(0.0, -low) + 0.1 * (high - low)  # a margin for inputs around the prototypes
    output.weight.copy_(weight.view_as(output.weight).float())
    output.bias.copy_(bias.float())
    return True


@torch.no_grad()
def principal_head(model: nn.Module, inputs: torch.Tensor) -> None:
    """Output layer rows = the principal directions of its input features (on `inputs`), scaled so the
    first logit has unit spread.

    A random classifier's top-2 logit margins are mostly below the quantization noise of the network
    under it (a random projection of the features against noise of the same size), so top-1 agreement
    between two int8 implementations would measure near-ties rather than the export. Along the
    principal directions, as after training, the logits follow the features' dominant variation.
    Everything else keeps its random weights (torchvision's ViT head starts as zeros: all-tied logits).
    """
    output = _output_layer(model, inputs[:1])
    if isinstance(output, nn.Conv2d) and (output.kernel_size != (1, 1) or output.groups != 1):
        return
    seen = _output_inputs(model, output, inputs)
    features = seen.movedim(1, -1) if isinstance(output, nn.Conv2d) else seen
    features = features.reshape(-1, features.shape[-1]).double()
    mean = features.mean(dim=0)
    _, singular, directions = torch.linalg.svd(features - mean, full_matrices=False)
    rows = min(output.weight.shape[0], directions.shape[0])
    weight = torch.zeros(output.weight.shape[:2], dtype=torch.float64)
    # the spread counted as at least 1e-3 of the features' size: where a random network's features barely
    # vary (they collapse), the logits stay small rather than float32 noise blown up
    spread = max(float(singular[0]) / len(features) ** 0.5, 1e-3 * float(features.pow(2).mean().sqrt()), 1e-12)
    weight[:rows] = directions[:rows] / spread
    output.weight.copy_(weight.view_as(output.weight).float())
    if output.bias is not None:
        output.bias.copy_((-weight @ mean).float())


def run_pass(name: str, state: ModelState, params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    spec = get_pass(name)
    result = spec.apply(state, spec.config_type(**params), ctx)
    return result.info


def outputs(zoo: ZooModel, model: nn.Module, inputs: Nested) -> torch.Tensor:
    """What the metrics read of the model's outputs on `inputs` (zoo.output of a ModelOutput), in eval mode."""
    with torch.no_grad():
        return selected(call_model(model.eval(), inputs), zoo.output)


def reload_check(zoo: ZooModel, state: ModelState, fresh: Callable[[], nn.Module], example: Nested) -> float:
    """The stage checkpoint, through torch.save/load(weights_only=True), into a freshly built model:
    returns the largest output difference (0 for an exact reload)."""
    buffer = io.BytesIO()
    torch.save(state.checkpoint(), buffer)
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=True)
    loaded = ModelState.from_checkpoint(fresh(), payload)
    return float((outputs(zoo, loaded.model, example) - outputs(zoo, state.model, example)).abs().max())


def run_zoo_model(
    zoo: ZooModel, settings: Settings | None = None, workdir: Path | None = None, *, stop_on_error: bool = False
) -> ZooResult:
    """Every step of the pipeline on `zoo`; never raises for a step's failure unless stop_on_error."""
    from export.lint import lint_onnx
    from export.onnx_export import export_onnx
    from export.ort_runner import class_axis, file_size, measure_latency, ort_session, parity, predict
    from export.qdq import convert_to_int8

    settings = settings or Settings()
    result = ZooResult(zoo.name)
    data = random_data(zoo, settings)
    example = data.test[0][0].unsqueeze(0)
    eval_x = data.test.tensors[0]
    temp = tempfile.TemporaryDirectory() if workdir is None else None
    out = Path(temp.name) if temp is not None else workdir
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    scratch: dict[str, Any] = {}

    def ctx(name: str) -> StageContext:
        context = StageContext.standalone(
            data, seed=settings.seed, batch_size=settings.batch_size, name=name, output=zoo.output
        )
        context.calibration_samples = settings.calibration_samples
        context.baseline = scratch.get("baseline")
        return context

    def step(name: str, fn: Callable[[StepResult], None]) -> bool:
        record = result.steps[name]
        started = time.perf_counter()
        try:
            fn(record)
            record.status = "ok"
        except Exception as exc:  # recorded, not raised: the table shows every model's every step
            record.status = "fail"
            record.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            record.info["traceback"] = traceback.format_exc(limit=-6)
            if stop_on_error:
                raise
        finally:
            record.seconds = time.perf_counter() - started
        return record.status == "ok"

    def do_build(record: StepResult) -> None:
        model = build(zoo, settings, data)
        scratch["state"] = ModelState(model)
        scratch["baseline"] = ModelState(copy.deepcopy(model).eval())
        record.info["params"] = sum(p.numel() for p in model.parameters())

    def do_prune_channels(record: StepResult) -> None:
        state: ModelState = scratch["state"]
        before = head_counts(state.model)
        params = {
            "sparsity": settings.channel_sparsity,
            "granularity": "channels",
            "finetune": {"epochs": 0},
            "measure_dnr": False,
        }
        info = run_pass("prune.magnitude", state, params, ctx("prune-ch"))
        after = head_counts(state.model)
        result.heads = {name: [before[name], after[name]] for name in before}
        record.info["macs_ratio"] = info.get("macs_ratio")
        record.info["params_after"] = info.get("params_after")
        record.info["reload_diff"] = reload_check(zoo, state, lambda: build(zoo, settings), example)
        if record.info["reload_diff"] > 1e-4:
            raise AssertionError(f"channel-pruned checkpoint reloads with outputs off by {record.info['reload_diff']:.3g}")

    def do_prune_unstructured(record: StepResult) -> None:
        params = {"sparsity": settings.sparsity, "finetune": {"epochs": 0}, "measure_dnr": False}
        info = run_pass("prune.magnitude", scratch["state"], params, ctx("prune-un"))
        record.info["sparsity"] = info["steps"][-1]["sparsity"]

    def do_distill(record: StepResult) -> None:
        params = {"epochs": settings.distill_epochs, "lr": 0.01, "teacher": "baseline"}
        info = run_pass("distill.dot", scratch["state"], params, ctx("distill"))
        record.info["loss"] = info["final_loss"]

    def do_quantize(record: StepResult) -> None:
        state: ModelState = scratch["state"]
        # an image classifier's head on the model that is quantized and exported (class_head: pruning changed
        # its features); a language model's is its word embedding
        with torch.no_grad():
            images = zoo.sample == "image"
            record.info["head_refit"] = images and class_head(state.model.eval(), prototypes(zoo, settings))
        params = {
            "weight_bits": settings.weight_bits,
            "activation_bits": 8,
            "iterations": settings.iterations,
            "calibration_samples": settings.calibration_samples,
            "batch_size": settings.batch_size,
            "weight_range": "minmax",
            "act_calibration": "minmax",
        }
        info = run_pass("quantize.adaround", state, params, ctx("quantize"))
        record.info["layers"] = len(info["bits"])
        record.info["activation_quantizers"] = info["activation_quantizers"]
        # pruned weights stay exactly zero through quantization (masks as the quantized layers hold their
        # weights: [out, in], where a transformers Conv1D's were [in, out])
        for name, mask in oriented_masks(state.quant or {}, state.masks).items():
            layer = state.model.get_submodule(name.rpartition(".")[0])
            if hasattr(layer, "weight_int") and bool((layer.weight_int[~mask.bool()] != 0).any()):
                raise AssertionError(f"{name}: a pruned weight is non-zero after quantization")
        record.info["reload_diff"] = reload_check(zoo, state, lambda: build(zoo, settings), example)
        if record.info["reload_diff"] > 1e-5:
            raise AssertionError(f"quantized checkpoint reloads with outputs off by {record.info['reload_diff']:.3g}")

    def do_export(record: StepResult) -> None:
        state: ModelState = scratch["state"]
        qdq = export_onnx(state.model, example, out / "model.qdq.onnx")
        proto = convert_to_int8(qdq, "int8-trt")
        path = out / "model.int8-trt.onnx"
        path.write_bytes(proto.SerializeToString())
        scratch["int8"] = path
        record.info["bytes"] = file_size(path)
        # the reference for the size and latency ratios: the unpruned float model's fp32 ONNX
        scratch["fp32"] = export_onnx(scratch["baseline"].model, example, out / "baseline.fp32.onnx")
        result.size_ratio = file_size(path) / file_size(scratch["fp32"])

    def do_lint(record: StepResult) -> None:
        findings = lint_onnx(scratch["int8"])
        record.info["findings"] = [str(f) for f in findings]
        if findings:
            raise AssertionError(f"{len(findings)} lint findings, e.g. {findings[0]}")

    def do_parity(record: StepResult) -> None:
        state: ModelState = scratch["state"]
        session = ort_session(scratch["int8"], threads=1)
        reference = outputs(zoo, state.model, eval_x).numpy()
        got = predict(session, eval_x.numpy())
        result.parity = parity(reference, got)
        # the class per image, the next token per position ([N, L, vocab]: the last axis)
        classes = len(set(reference.argmax(axis=class_axis(reference.ndim)).flatten().tolist()))
        result.parity["classes_predicted"] = classes
        if classes == 1:
            # one class for every input: agreement would hold for any file, so it proves nothing
            raise AssertionError("the torch quantized model predicts one class for every input: parity untestable")
        if result.parity["top1_agreement"] < MIN_AGREEMENT:
            raise AssertionError(f"top-1 agreement {result.parity['top1_agreement']:.3f} < {MIN_AGREEMENT}")
        if settings.latency_runs and "fp32" in scratch:
            kw = {"batch_sizes": (1,), "warmup": 2, "runs": settings.latency_runs}
            fp32 = measure_latency(ort_session(scratch["fp32"], threads=1), example, **kw)["batch1"]
            int8 = measure_latency(session, example, **kw)["batch1"]
            assert isinstance(fp32, float) and isinstance(int8, float)
            result.latency_ratio = int8 / fp32
            record.info["latency_ms"] = {"fp32": fp32, "int8-trt": int8}

    try:
        plan = [
            ("build", do_build),
            ("prune-ch", do_prune_channels),
            ("prune-un", do_prune_unstructured),
            ("distill", do_distill),
            ("quantize", do_quantize),
            ("export", do_export),
            ("lint", do_lint),
            ("parity", do_parity),
        ]
        # what each step needs: a failed channel prune leaves the model usable for the rest
        needs = {"prune-ch": "build", "prune-un": "build", "distill": "build", "quantize": "build",
                 "export": "quantize", "lint": "export", "parity": "export"}
        for name, fn in plan:
            need = needs.get(name)
            if need is not None and result.steps[need].status != "ok":
                continue
            if name == "prune-ch":
                # Torch-Pruning changes the model in place; a failure must not leave it half-pruned
                saved = copy.deepcopy(scratch["state"])
                if not step(name, fn):
                    scratch["state"] = saved
                continue
            step(name, fn)
    finally:
        if temp is not None:
            temp.cleanup()
    return result


def format_table(results: list[ZooResult]) -> str:
    """One row per model: each step's status, parity, size and latency ratios; then the errors."""
    # classes: how many of the classes the torch quantized model predicts on the parity inputs (agreement
    # over few distinct predictions is weaker evidence than over many)
    header = ["model", *STEPS, "top1 agree", "classes", "max|diff|", "size", "latency", "heads", "seconds"]
    rows = [header]
    for r in results:
        heads = ""
        if r.heads:
            before = sum(b for b, _ in r.heads.values())
            after = sum(a for _, a in r.heads.values())
            heads = f"{before}->{after}"
        rows.append(
            [
                r.model,
                *(r.steps[s].status for s in STEPS),
                f"{r.parity['top1_agreement']:.3f}" if r.parity else "-",
                f"{r.parity['classes_predicted']:.0f}" if "classes_predicted" in r.parity else "-",
                f"{r.parity['max_abs_diff']:.2g}" if r.parity else "-",
                f"{r.size_ratio:.3f}" if r.size_ratio is not None else "-",
                f"{r.latency_ratio:.2f}" if r.latency_ratio is not None else "-",
                heads or "-",
                f"{sum(s.seconds for s in r.steps.values()):.0f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    errors = [f"  {r.model}: {r.first_error()}" for r in results if r.first_error()]
    if errors:
        lines += ["", "gaps:", *errors]
    return "\n".join(lines)
