"""distill.dot benchmark: cross-entropy alone vs plain KD vs DOT, same epochs, data and schedule.

(a) recovery: the MNIST-5k ResNet-20 reference pruned 95% (global magnitude, one shot), retrained with the
    masks held, the unpruned reference as teacher;
(b) student: a ResNet-8 of width 8 trained from scratch, the ResNet-20 reference as teacher.
Each trainer runs with 3 seeds (data order, augmentation and, in (b), the student's initialisation);
the table gives test top-1 mean and sample standard deviation, and the wall time per epoch.

    python bench/distill.py            # 23 minutes measured on 2 cores shared with other work
    python bench/distill.py --quick    # 1 seed, 1 epoch each: a smoke run (4 to 17 minutes measured, by load)
    python bench/distill.py --tasks b --trainers kd,dot --student-epochs 10    # a longer schedule

The teacher is the cached reference of recipes/mnist-resnet20.yaml (trained and cached on first use).
One test error is 0.1 point; differences under ~0.5 point are noise on this split (../shared/PEERS.md).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from _common import reference, test_top1  # noqa: E402  (also puts the repository on sys.path)

from compress.models import build_model  # noqa: E402
from compress.passes.distill_dot import DistillDotConfig, distill  # noqa: E402
from compress.recipe import ModelConfig  # noqa: E402
from compress.sparsity import apply_masks, magnitude_masks, prunable_layers, sparsity_stats  # noqa: E402

TRAINERS = ("ce", "kd", "dot")


def step_milliseconds(student: nn.Module, teacher: nn.Module, data, batch_size: int, trainers: list[str]) -> dict:
    """Median time of one step's gradients per trainer, the trainers interleaved step by step so that load
    from other processes falls on all alike (per-epoch times of separate runs swing with it)."""
    from compress.losses import Objective, cross_entropy, kl
    from compress.passes.distill_dot import _gradients

    x = torch.stack([data.train[i][0] for i in range(batch_size)])
    y = torch.tensor([int(data.train[i][1]) for i in range(batch_size)])
    params = list(student.train().parameters())
    times: dict[str, list[float]] = {t: [] for t in trainers}
    for step in range(12):
        for trainer in trainers:
            started = time.perf_counter()
            _gradients(student, teacher, x, y, params, DistillDotConfig(trainer=trainer), Objective(cross_entropy, kl), trainer)
            if step >= 2:  # the first steps warm allocator and kernels up
                times[trainer].append(1000 * (time.perf_counter() - started))
    return {trainer: statistics.median(values) for trainer, values in times.items()}


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
    parser.add_argument("--tasks", default="a,b", help="which of (a) recovery, (b) student to run")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--delta", type=float, default=None, help="DOT's delta (default: the pass default)")
    args = parser.parse_args()
    trainers = [t for t in args.trainers.split(",") if t]
    if not set(trainers) <= set(TRAINERS):
        parser.error(f"--trainers: choose from {', '.join(TRAINERS)}")
    if args.quick:
        args.seeds, args.recover_epochs, args.student_epochs = 1, 1, 1
    torch.set_num_threads(args.threads)

    teacher, data, _ = reference("resnet20")
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
    tasks = [task for task in tasks if task[0][1] in args.tasks.split(",")]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    delta = {} if args.delta is None else {"delta": args.delta}
    started = time.perf_counter()
    for name, make, epochs in tasks:
        # trainers interleaved within each seed, so load from other processes falls on all of them alike
        for seed in range(args.seeds):
            for trainer in trainers:
                model, model_masks = make(seed)
                cfg = DistillDotConfig(epochs=epochs, trainer=trainer, shift=2, **delta)
                run = distill(model, teacher, data.train, cfg, batch_size=args.batch_size, seed=seed, masks=model_masks)
                accuracy = test_top1(model, data)
                if model_masks:
                    assert sparsity_stats(model)["sparsity"] == pruned_sparsity, "masks did not hold"
                per_epoch = statistics.mean(run.epoch_seconds)
                results.setdefault((name, trainer), []).append((accuracy, per_epoch))
                print(f"  {name} | {trainer} | seed {seed}: {accuracy:.4f} ({per_epoch:.1f} s/epoch)", flush=True)

    print(f"\nmnist5k test split (1,000 images), batch {args.batch_size}, lr 0.05 cosine, T=4, w_ce 0.1, w_kd 0.9, mu 0.9, "
          f"delta {DistillDotConfig(**delta).delta}, wd 5e-4, +-2 px shifts; {args.seeds} seeds; torch threads {args.threads}")  # fmt: skip
    print("| task | trainer | test top-1 mean | std | per seed | s/epoch |")
    print("|---|---|---|---|---|---|")
    for name, _, _ in tasks:
        for trainer in trainers:
            rows = results[(name, trainer)]
            accs = [a for a, _ in rows]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            seconds = statistics.mean(s for _, s in rows)
            per_seed = " ".join(f"{a:.3f}" for a in accs)
            print(f"| {name} | {trainer} | {statistics.mean(accs):.4f} | {spread:.4f} | {per_seed} | {seconds:.1f} |")
    for name, _, _ in tasks:
        if not {"kd", "dot"} <= set(trainers):
            break
        kd = statistics.mean(s for _, s in results[(name, "kd")])
        dot = statistics.mean(s for _, s in results[(name, "dot")])
        print(f"{name}: dot {dot:.1f} s/epoch vs kd {kd:.1f} s/epoch ({dot / kd:.2f}x)")
    print("\none step's gradients (forward, teacher, backward), median of 10 interleaved steps:")
    for name, make, _ in tasks:
        ms = step_milliseconds(make(0)[0], teacher, data, args.batch_size, trainers)
        ratio = f"; dot/kd {ms['dot'] / ms['kd']:.2f}x" if {"kd", "dot"} <= set(ms) else ""
        print(f"{name}: " + ", ".join(f"{t} {v:.0f} ms" for t, v in ms.items()) + ratio)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
