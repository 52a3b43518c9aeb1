"""distill.dot benchmark: cross-entropy alone vs plain KD vs DOT, same epochs, data and schedule.

(a) recovery: the MNIST-5k ResNet-20 reference pruned 95% (global magnitude, one shot), retrained with the
    masks held, the unpruned reference as teacher;
(b) student: a ResNet-8 of width 8 trained from scratch, the ResNet-20 reference as teacher.
Each trainer runs with 3 seeds (data order, augmentation and, in (b), the student's initialisation);
the table gives test top-1 mean and sample standard deviation, and the wall time per epoch.

    python bench/distill.py            # about 20 minutes on 2 busy cores
    python bench/distill.py --quick    # 1 seed, 1 epoch each: a smoke run

The teacher is the cached reference of recipes/mnist-resnet20.yaml (trained and cached on first use).
One test error is 0.1 point; differences under ~0.5 point are noise on this split (../shared/PEERS.md).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.data import DataSplits, load_data  # noqa: E402
from compress.metrics import resolve_metric  # noqa: E402
from compress.models import build_model  # noqa: E402
from compress.passes.distill_dot import DistillDotConfig, distill  # noqa: E402
from compress.progress import RunProgress  # noqa: E402
from compress.recipe import ModelConfig, load_recipe  # noqa: E402
from compress.reference import obtain_reference  # noqa: E402
from compress.sparsity import apply_masks, magnitude_masks, prunable_layers, sparsity_stats  # noqa: E402
from compress.train import predict  # noqa: E402

TRAINERS = ("ce", "kd", "dot")
TOP1 = resolve_metric("top1")


def test_top1(model: nn.Module, data: DataSplits) -> float:
    return float(TOP1(*predict(model, data.test)))


def teacher_and_data() -> tuple[nn.Module, DataSplits]:
    recipe = load_recipe(ROOT / "recipes" / "mnist-resnet20.yaml")
    data = load_data(recipe.data)
    channels, size, _ = data.input_shape
    teacher = build_model(recipe.model, in_channels=channels, num_classes=data.num_classes, input_size=size)
    obtain_reference(teacher, recipe, data, torch.device("cpu"), RunProgress())
    return teacher.eval(), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch per task")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recover-epochs", type=int, default=1)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="DOT's CIFAR setting")
    parser.add_argument("--student-width", type=int, default=8)
    # one thread: on a shared 2-core machine a second OpenMP thread mostly spin-waits (2-3x slower here)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.recover_epochs, args.student_epochs = 1, 1, 1
    torch.set_num_threads(args.threads)

    teacher, data = teacher_and_data()
    channels, size, _ = data.input_shape
    pruned = copy.deepcopy(teacher)
    masks = magnitude_masks(prunable_layers(pruned), 0.95, "global")
    apply_masks(pruned, masks)
    pruned_sparsity = sparsity_stats(pruned)["sparsity"]
    print(f"teacher ResNet-20: test top-1 {test_top1(teacher, data):.4f}")
    print(f"pruned 95% (conv weights; overall {pruned_sparsity:.4f}): test top-1 {test_top1(pruned, data):.4f}")

    def recovery(seed: int) -> tuple[nn.Module, dict]:
        return copy.deepcopy(pruned), masks

    def student(seed: int) -> tuple[nn.Module, dict]:
        torch.manual_seed(seed)
        cfg = ModelConfig(arch="builtin:resnet8", kwargs={"width": args.student_width})
        return build_model(cfg, in_channels=channels, num_classes=data.num_classes, input_size=size), {}

    tasks = [
        (f"(a) recover 95%-sparse ResNet-20, {args.recover_epochs} ep", recovery, args.recover_epochs),
        (f"(b) ResNet-20 -> ResNet-8 w{args.student_width}, {args.student_epochs} ep", student, args.student_epochs),
    ]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    started = time.perf_counter()
    for name, make, epochs in tasks:
        # trainers interleaved within each seed, so load from other processes falls on all of them alike
        for seed in range(args.seeds):
            for trainer in TRAINERS:
                model, model_masks = make(seed)
                cfg = DistillDotConfig(epochs=epochs, trainer=trainer, shift=2)
                run = distill(model, teacher, data.train, cfg, batch_size=args.batch_size, seed=seed, masks=model_masks)
                accuracy = test_top1(model, data)
                if model_masks:
                    assert sparsity_stats(model)["sparsity"] == pruned_sparsity, "masks did not hold"
                per_epoch = statistics.mean(run.epoch_seconds)
                results.setdefault((name, trainer), []).append((accuracy, per_epoch))
                print(f"  {name} | {trainer} | seed {seed}: {accuracy:.4f} ({per_epoch:.1f} s/epoch)", flush=True)

    print(f"\nmnist5k test split (1,000 images), batch {args.batch_size}, lr 0.05 cosine, T=4, w_ce 0.1, w_kd 0.9, mu 0.9, "
          f"delta 0.075, wd 5e-4, +-2 px shifts; {args.seeds} seeds; torch threads {args.threads}")  # fmt: skip
    print("| task | trainer | test top-1 mean | std | per seed | s/epoch |")
    print("|---|---|---|---|---|---|")
    for name, _, _ in tasks:
        for trainer in TRAINERS:
            rows = results[(name, trainer)]
            accs = [a for a, _ in rows]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            seconds = statistics.mean(s for _, s in rows)
            per_seed = " ".join(f"{a:.3f}" for a in accs)
            print(f"| {name} | {trainer} | {statistics.mean(accs):.4f} | {spread:.4f} | {per_seed} | {seconds:.1f} |")
    for name, _, _ in tasks:
        kd = statistics.mean(s for _, s in results[(name, "kd")])
        dot = statistics.mean(s for _, s in results[(name, "dot")])
        print(f"{name}: dot {dot:.1f} s/epoch vs kd {kd:.1f} s/epoch ({dot / kd:.2f}x)")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
