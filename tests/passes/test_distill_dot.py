"""distill.dot: the DOT update rule against SGD and against a hand computation, masks, teachers, config."""
from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from compress.data import DataSplits
from compress.errors import BadInput
from compress.models.registry import get_builtin
from compress.optim import DOT
from compress.passes.distill_dot import DistillDotConfig, distill, distill_dot, resolve_teacher
from compress.recipe import parse_recipe
from compress.sparsity import apply_masks, magnitude_masks, prunable_layers, sparsity_stats
from compress.state import ModelState, StageContext
from compress.losses import kl as kd_loss

W_CE, W_KD, T, LR, MU, WD = 0.1, 0.9, 4.0, 0.05, 0.9, 5e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 5))


def _batches(steps: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 12, generator=generator), torch.randint(0, 5, (size,), generator=generator)) for _ in range(steps)]


def _losses(model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    with torch.no_grad():
        teacher_logits = teacher(x)
    return W_CE * F.cross_entropy(logits, y), W_KD * kd_loss(logits, teacher_logits, T)


def _dot_step(model: nn.Module, teacher: nn.Module, optimizer: DOT, x: torch.Tensor, y: torch.Tensor) -> None:
    params = list(model.parameters())
    task, distill_loss = _losses(model, teacher, x, y)
    g_task = torch.autograd.grad(task, params, retain_graph=True)
    g_kd = torch.autograd.grad(distill_loss, params)
    optimizer.step(list(g_task), list(g_kd))


def test_kd_loss_is_t_squared_kl() -> None:
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    p_teacher = F.softmax(teacher / T, dim=1)
    by_hand = (p_teacher * (p_teacher.log() - F.log_softmax(student / T, dim=1))).sum(1).mean() * T * T
    torch.testing.assert_close(kd_loss(student, teacher, T), by_hand)


def test_delta_zero_is_sgd_with_momentum_on_the_weighted_sum() -> None:
    teacher, dot_model = _mlp(0), _mlp(1)
    sgd_model = copy.deepcopy(dot_model)
    dot = DOT(dot_model.parameters(), lr=LR, momentum=MU, delta=0.0, weight_decay=WD)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=MU, weight_decay=WD)
    for x, y in _batches(6):
        _dot_step(dot_model, teacher, dot, x, y)
        sgd.zero_grad()
        sum(_losses(sgd_model, teacher, x, y)).backward()
        sgd.step()
        for a, b in zip(dot_model.parameters(), sgd_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_delta_positive_matches_a_hand_computed_two_buffer_update() -> None:
    delta = 0.075
    teacher, model = _mlp(0), _mlp(1)
    optimizer = DOT(model.parameters(), lr=LR, momentum=MU, delta=delta, weight_decay=WD)
    theta = [p.detach().clone() for p in model.parameters()]
    v_task: list[torch.Tensor] = []
    v_kd: list[torch.Tensor] = []
    for step, (x, y) in enumerate(_batches(5)):
        params = list(model.parameters())
        task, distill_loss = _losses(model, teacher, x, y)
        g_task = [g.clone() for g in torch.autograd.grad(task, params, retain_graph=True)]
        g_kd = [g.clone() for g in torch.autograd.grad(distill_loss, params)]
        for i, (gt, gk) in enumerate(zip(g_task, g_kd)):
            d_task = gt + WD * theta[i]  # weight decay on the task branch only
            if step == 0:  # SGD's first step: the buffers are the gradients themselves
                v_task.append(d_task.clone())
                v_kd.append(gk.clone())
            else:
                v_task[i] = (MU - delta) * v_task[i] + d_task
                v_kd[i] = (MU + delta) * v_kd[i] + gk
            theta[i] = theta[i] - LR * (v_task[i] + v_kd[i])
        optimizer.step(g_task, g_kd)
        for p, expected in zip(model.parameters(), theta):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
    # the hand computation is not vacuous: DOT moved away from what plain momentum would do
    assert any(not torch.allclose(a, b) for a, b in zip(v_task, v_kd))


def test_a_parameter_with_one_gradient_is_plain_sgd_with_mu() -> None:
    only_task, only_kd, neither = (torch.ones(3, requires_grad=True) for _ in range(3))
    optimizer = DOT([only_task, only_kd, neither], lr=0.1, momentum=0.8, delta=0.1, weight_decay=0.01)
    reference = torch.optim.SGD([t := only_task.detach().clone().requires_grad_(), k := only_kd.detach().clone().requires_grad_()],
                                lr=0.1, momentum=0.8, weight_decay=0.01)  # fmt: skip
    for step in range(3):
        g1, g2 = torch.full((3,), 0.5 + step), torch.full((3,), -1.0 - step)
        optimizer.step([g1, None, None], [None, g2, None])
        t.grad, k.grad = g1.clone(), g2.clone()
        reference.step()
    torch.testing.assert_close(only_task.detach(), t.detach())
    torch.testing.assert_close(only_kd.detach(), k.detach())
    assert torch.equal(neither.detach(), torch.ones(3))


def test_state_dict_round_trip_continues_exactly() -> None:
    teacher, model = _mlp(0), _mlp(1)
    batches = _batches(5)
    straight = copy.deepcopy(model)
    optimizer = DOT(straight.parameters(), lr=LR, momentum=MU, delta=0.075, weight_decay=WD)
    for x, y in batches:
        _dot_step(straight, teacher, optimizer, x, y)

    first = DOT(model.parameters(), lr=LR, momentum=MU, delta=0.075, weight_decay=WD)
    for x, y in batches[:3]:
        _dot_step(model, teacher, first, x, y)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = DOT(model.parameters(), lr=LR, momentum=MU, delta=0.075, weight_decay=WD)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for x, y in batches[3:]:
        _dot_step(model, teacher, resumed, x, y)
    for a, b in zip(model.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_dot_with_delta_zero_trains_like_kd_in_the_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(40, 1, 3, 4, generator=generator), torch.randint(0, 5, (40,), generator=generator))
    teacher = _mlp(0).eval()
    runs = {}
    for trainer in ("dot", "kd"):
        student = _mlp(1)
        cfg = DistillDotConfig(epochs=2, trainer=trainer, delta=0.0, shift=1, schedule="step")
        distill(student, teacher, dataset, cfg, batch_size=16, seed=5)
        runs[trainer] = student
    for a, b in zip(runs["dot"].parameters(), runs["kd"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- the pass -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_splits() -> DataSplits:
    from compress.data import load_data
    from compress.recipe import DataConfig

    return load_data(DataConfig(dataset="digits", batch_size=64))


@pytest.fixture
def digits_context(digits_splits: DataSplits) -> StageContext:
    from compress.progress import RunProgress
    from compress.train import predict

    def top1(model: nn.Module) -> float:
        logits, labels = predict(model, digits_splits.val)
        return float((logits.argmax(1) == labels).float().mean())

    return StageContext(
        data=digits_splits, device=torch.device("cpu"), seed=0, batch_size=64,
        progress=RunProgress(quiet=True), evaluate=top1, stage_name="recover",
    )  # fmt: skip


def _digits_mlp(seed: int, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@pytest.fixture(scope="module")
def trained(digits_splits: DataSplits) -> nn.Module:
    from compress.train import fit

    model = _digits_mlp(0)
    fit(model, digits_splits.train, epochs=3, lr=0.1, batch_size=64, schedule="onecycle")
    return model


def _context(ctx: StageContext, trained: nn.Module, tmp_path: Path) -> StageContext:
    ctx.baseline = ModelState(copy.deepcopy(trained).eval())
    ctx.stage_dir = tmp_path / "stages" / "02-recover"
    ctx.recipe_dir = tmp_path
    return ctx


def test_pass_keeps_the_pruned_sparsity_and_saves_optimizer_state(
    digits_context: StageContext, trained: nn.Module, tmp_path: Path
) -> None:
    ctx = _context(digits_context, trained, tmp_path)
    model = copy.deepcopy(trained)
    masks = magnitude_masks(prunable_layers(model), 0.9, "global")
    apply_masks(model, masks)
    before = sparsity_stats(model)
    result = distill_dot(ModelState(model, masks), DistillDotConfig(epochs=1), ctx)
    after = sparsity_stats(result.state.model)
    assert after["sparsity"] == before["sparsity"] and after["params_nonzero"] <= before["params_nonzero"]
    params = dict(result.state.model.named_parameters())
    for key, mask in masks.items():
        assert torch.all(params[key][~mask] == 0), key
    info = result.info
    assert info["trainer"] == "dot" and info["teacher"] == "baseline" and info["teacher_metric"] > 0.5
    assert info["seconds_per_epoch"] > 0 and info["world_size"] == 1
    saved = torch.load(ctx.stage_dir / "optimizer.pt", weights_only=True)
    assert saved["trainer"] == "dot" and saved["epochs_done"] == 1
    assert {"task_buffer", "kd_buffer"} <= set(saved["optimizer"]["state"][0])
    # the baseline teacher was copied, never trained
    for a, b in zip(ctx.baseline.model.parameters(), trained.parameters()):
        assert torch.equal(a, b)


def test_teacher_previous_and_ce(digits_context: StageContext, trained: nn.Module, tmp_path: Path) -> None:
    ctx = _context(digits_context, trained, tmp_path)
    student = _digits_mlp(1, hidden=16)
    state = ModelState(student)
    teacher = resolve_teacher(DistillDotConfig(teacher="previous"), state, ctx)
    assert teacher is not student and not any(p.requires_grad for p in teacher.parameters())
    for a, b in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(a, b)
    result = distill_dot(state, DistillDotConfig(epochs=1, trainer="ce", teacher="previous"), ctx)
    assert result.info["teacher"] is None and result.info["teacher_metric"] is None


def test_teacher_from_a_source_and_a_checkpoint_next_to_the_recipe(
    digits_context: StageContext, trained: nn.Module, tmp_path: Path
) -> None:
    ctx = _context(digits_context, trained, tmp_path)
    saved = get_builtin("resnet8")(in_channels=1, num_classes=10, input_size=8, width=4)
    torch.save(saved.state_dict(), tmp_path / "teacher.pt")
    student = ModelState(_digits_mlp(1, hidden=16))
    cfg = DistillDotConfig(teacher="builtin:resnet8", teacher_kwargs={"width": 4}, teacher_checkpoint="teacher.pt")
    teacher = resolve_teacher(cfg, student, ctx)
    for a, b in zip(teacher.parameters(), saved.parameters()):
        assert torch.equal(a, b)

    missing = cfg.model_copy(update={"teacher_checkpoint": "nope.pt"})
    with pytest.raises(BadInput, match=r"params\.teacher_checkpoint: file not found"):
        resolve_teacher(missing, student, ctx)
    wrong_arch = cfg.model_copy(update={"teacher_kwargs": {"width": 8}})
    with pytest.raises(BadInput, match=r"params\.teacher_checkpoint: .*does not match"):
        resolve_teacher(wrong_arch, student, ctx)
    seven = get_builtin("resnet8")(in_channels=1, num_classes=7, input_size=8, width=4)
    torch.save(seven.state_dict(), tmp_path / "seven.pt")
    wrong_classes = cfg.model_copy(update={"teacher_checkpoint": "seven.pt", "teacher_kwargs": {"width": 4, "num_classes": 7}})
    with pytest.raises(BadInput, match=r"params\.teacher: .*outputs tensor \[1, 7\], the student tensor \[1, 10\]"):
        resolve_teacher(wrong_classes, student, ctx)
    with pytest.raises(BadInput, match=r"params\.teacher: unknown builtin"):
        resolve_teacher(DistillDotConfig(teacher="builtin:nope", teacher_checkpoint="teacher.pt"), student, ctx)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"delta": 0.15}, "delta"),
        ({"teacher": "resnet20"}, "teacher"),
        ({"teacher": "builtin:resnet20"}, "teacher_checkpoint"),
        ({"teacher_checkpoint": "t.pt"}, "teacher_checkpoint"),
        ({"trainer": "sgd"}, "trainer"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_bad_params_name_the_field(params: dict, field: str) -> None:
    recipe = {
        "name": "r",
        "model": {"arch": "builtin:resnet8"},
        "data": {"dataset": "digits"},
        "stages": [{"name": "kd", "pass": "distill.dot", "params": params}],
    }
    with pytest.raises(BadInput, match=rf"stages\[0\]\.params.*{field}") as info:
        parse_recipe(recipe)
    assert "\n" not in str(info.value)


def test_a_missing_teacher_checkpoint_is_refused_before_the_run_directory_exists(
    tiny_recipe: dict, write_recipe, tmp_path: Path
) -> None:
    from compress.runner import RunOptions, run_recipe
    from compress.validate import validate_recipe

    params = {"teacher": "builtin:resnet8", "teacher_checkpoint": "teacher.pt"}
    tiny_recipe["stages"].append({"name": "kd", "pass": "distill.dot", "params": params})
    recipe = write_recipe(tiny_recipe)
    for check in (lambda: validate_recipe(recipe), lambda: run_recipe(recipe, RunOptions(out=tmp_path / "run", quiet=True))):
        with pytest.raises(BadInput, match=r"stages\[1\]\.params\.teacher_checkpoint: file not found: .*teacher\.pt$"):
            check()
    assert not (tmp_path / "run").exists()
    torch.save({}, tmp_path / "teacher.pt")  # found next to the recipe: validate is satisfied
    validate_recipe(recipe)


# --- end to end ----------------------------------------------------------------------------------------


def _cli(args: list[str], env: dict) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_prune_distill_export_from_the_cli_alone_and_under_torchrun(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    tiny_recipe["stages"] = [
        {"name": "prune", "pass": "prune.magnitude", "params": {"sparsity": 0.95, "finetune": {"epochs": 0}}},
        {"name": "recover", "pass": "distill.dot", "params": {"epochs": 2, "lr": 0.05}, "gate": {"max_drop": 0.3}},
    ]
    from typer.testing import CliRunner

    from compress.cli import app

    recipe = str(write_recipe(tiny_recipe))
    # alone in this process (and the reference it trains is cached for the second run)
    result = CliRunner().invoke(app, ["run", recipe, "--quiet", "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _cli([*torchrun, "-m", "compress.cli", "run", recipe, "--quiet", "--out", str(tmp_path / "two")], env)
    for out in ("one", "two"):
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert report["status"] == "passed", out
        prune, recover = report["stages"]
        assert recover["sparsity"] == prune["sparsity"] > 0.9
        assert recover["params_nonzero"] <= prune["params_nonzero"]
        assert recover["metric"] > prune["metric"] and recover["world_size"] == (1 if out == "one" else 2)
        payload = torch.load(tmp_path / out / recover["checkpoint"], weights_only=True)
        for key, mask in payload["masks"].items():
            assert torch.all(payload["state_dict"][key][~mask] == 0), key
        assert torch.load(tmp_path / out / recover["optimizer_state"], weights_only=True)["trainer"] == "dot"
        assert (tmp_path / out / report["export"]["fp32"]["path"]).is_file()
