"""Eager PyTorch training steps as mdistiller/torchdistill run them (SGD, channels_last), and a timer.

A step takes `(images, labels)`: images (B, 3, H, W) float32 (any memory format; converted to
channels_last), labels (B,) int64, on the model's device; it returns the loss as a Python float.
`autocast_dtype=torch.bfloat16` runs the forward and the loss under `torch.autocast` on that device (mixed
precision: parameters, gradients and the optimizer stay float32, as with `config.dtype` in debkd_jax).
"""

import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Step = Callable[[torch.Tensor, torch.Tensor], float]


def _sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _autocast(model: nn.Module, dtype: torch.dtype | None):
    """A context factory: `torch.autocast` to `dtype` on the model's device, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext
    device_type = next(model.parameters()).device.type
    return lambda: torch.autocast(device_type, dtype=dtype)


def make_train_step(model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                    weight_decay: float = 5e-4, autocast_dtype: torch.dtype | None = None) -> Step:
    """One SGD step of cross entropy on `model` (trained in place, in train mode)."""
    model.to(memory_format=torch.channels_last).train()
    opt = _sgd(model, lr, momentum, weight_decay)
    autocast = _autocast(model, autocast_dtype)

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        with autocast():
            logits, _ = model(images.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def make_kd_train_step(student: nn.Module, teacher: nn.Module, temperature: float = 4.0,
                       alpha: float = 0.9, lr: float = 0.1, momentum: float = 0.9,
                       weight_decay: float = 5e-4) -> Step:
    """One SGD step of Hinton KD on `student`, running the eval-mode teacher forward on every step (online).

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y).
    """
    student.to(memory_format=torch.channels_last).train()
    teacher.to(memory_format=torch.channels_last).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = _sgd(student, lr, momentum, weight_decay)

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            teacher_logits, _ = teacher(images)
        logits, _ = student(images)
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=-1),
                      F.log_softmax(teacher_logits / temperature, dim=-1),
                      reduction="batchmean", log_target=True)
        loss = alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def images_per_second(step_fn: Step, batch_size: int, steps: int, warmup: int,
                      num_classes: int = 2, image_size: int = 32, device: str = "cpu",
                      seed: int = 0) -> float:
    """Training throughput of `step_fn` on one fixed random batch, after `warmup` untimed steps."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    for _ in range(warmup):
        step_fn(images, labels)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(images, labels)
    return batch_size * steps / (time.perf_counter() - start)
