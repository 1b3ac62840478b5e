"""The study's training run in plain PyTorch: the baseline `cxrdist.train` is measured against.

    python benchmarks/baseline_study.py TRAIN_DIR TEST_DIR [--epochs 20] [--batch-size 32] [--workers 2]
                                        [--augment] [--seed 0] [--json OUT] [--image-size 128]

TRAIN_DIR and TEST_DIR are torchvision ImageFolder roots (``<Class>/**/*.png``; class order is the sorted
folder names, which for the database is cxrdist's label order). What the study did, and nothing more:
ImageFolder on the original (299 px) PNGs, CPU transforms Resize(128) [+ RandomRotation(10) +
RandomHorizontalFlip when augmenting] + ToTensor + Normalize(ImageNet) in DataLoader workers, the study's
CNN (`cxrdist.models.seed_cnn`, the identical network), SGD lr 0.01 momentum 0.9, log_softmax + NLLLoss,
fp32, NCHW; train for --epochs, then test accuracy of the last epoch's weights.

Prints one JSON object on stdout (and writes it to --json): test accuracy, per-epoch seconds, train
images/s. `benchmarks/run.py` times the whole process from outside, as it does `python -m cxrdist.train`.

Run as a file, as a user runs the study's script, never as ``python -m benchmarks...``: importing the
`benchmarks` package sets OMP_WAIT_POLICY, which the plain baseline must not get. So it imports nothing
from `benchmarks` (the image size comes as --image-size), only the installed cxrdist and shard_tools.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

from cxrdist.models import seed_cnn
from shard_tools.schema import IMAGENET_MEAN, IMAGENET_STD

STUDY_SIZE_PX = 128  # the study's Resize(128); benchmarks pass their IMAGE_SIZE_PX as --image-size


def study_transform(augment: bool, size_px: int = STUDY_SIZE_PX) -> transforms.Compose:
    """PIL image (ImageFolder opens it as RGB) -> float32 (3, S, S), ImageNet-normalised."""
    steps = [transforms.Resize(size_px)]
    if augment:
        steps += [transforms.RandomRotation(10), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train_dir", type=Path, help="ImageFolder root of the training images")
    p.add_argument("test_dir", type=Path, help="ImageFolder root of the test images")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--augment", action="store_true", help="the study's rotations and flips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--image-size", type=int, default=STUDY_SIZE_PX, help="Resize() to this many pixels")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_set = datasets.ImageFolder(
        str(args.train_dir), transform=study_transform(args.augment, args.image_size)
    )
    test_set = datasets.ImageFolder(str(args.test_dir), transform=study_transform(False, args.image_size))
    if train_set.classes != test_set.classes:
        print(f"error: class folders differ: {train_set.classes} vs {test_set.classes}", file=sys.stderr)
        return 1
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers
    )
    test_loader = torch.utils.data.DataLoader(
        test_set, batch_size=2 * args.batch_size, num_workers=args.workers
    )

    model = seed_cnn(num_classes=len(train_set.classes), in_chans=3)  # ImageFolder gives RGB, as the study
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    epoch_seconds = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        start = time.perf_counter()
        loss_sum, batches = 0.0, 0
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = F.nll_loss(F.log_softmax(model(images), dim=1), labels)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            batches += 1
        epoch_seconds.append(time.perf_counter() - start)
        print(
            f"epoch {epoch}: loss {loss_sum / max(batches, 1):.4f}  {epoch_seconds[-1]:.2f} s",
            file=sys.stderr,
        )

    model.eval()
    start = time.perf_counter()
    correct = 0
    with torch.no_grad():
        for images, labels in test_loader:
            correct += int((model(images).argmax(1) == labels).sum())
    test_seconds = time.perf_counter() - start
    train_seconds = sum(epoch_seconds)
    result = {
        "test_accuracy": correct / len(test_set),
        "num_train": len(train_set),
        "num_test": len(test_set),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "epoch_seconds": epoch_seconds,
        "train_images_per_s": len(train_set) * args.epochs / train_seconds if train_seconds else None,
        "test_seconds": test_seconds,
    }
    text = json.dumps(result)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
