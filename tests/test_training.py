"""Tests of the shared training loop (atop.training) on real CIFAR-10 images, bf16 autocast
and the progress bars (atop.progress)."""

from __future__ import annotations

import inspect
import io
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atop import training
from atop.checkpoint import CheckpointError, load_safe
from atop.progress import progress
from atop.training import (
    Batches,
    LoopConfig,
    NonFiniteLossError,
    accuracy,
    autocast,
    bf16_available,
    fit,
    resolve_device,
    seed_everything,
)

N_IMAGES = 64
BATCH = 16
EPOCHS = 3


@pytest.fixture(scope="module")
def real_uint8(cifar10_test_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """64 real CIFAR-10 test images as uint8 [64, 3, 32, 32] and their int64 labels."""
    images, labels = cifar10_test_batch
    return (images[:N_IMAGES] * 255).round().to(torch.uint8), labels[:N_IMAGES]


class TinyNet(nn.Module):
    """A small conv net with BN and dropout (exercises buffers and the global RNG)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4)
        )
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x).flatten(1)))


class Interrupt(KeyboardInterrupt):
    """Raised by a train_step to simulate Ctrl-C in the middle of an epoch."""


def _run(real_uint8, tmp_path=None, fingerprint=None, fail_at=None, nan_at=None, calls=None):
    """A seeded run of fit; returns (model, history). ``fail_at``/``nan_at`` = (epoch, batch)."""
    generator = seed_everything(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    batches = Batches(*real_uint8, BATCH, shuffle=True, generator=generator, augment=True)
    config = LoopConfig(
        epochs=EPOCHS,
        resume_path=None if tmp_path is None else str(tmp_path / "resume.pt"),
        fingerprint=fingerprint or {"lr": 0.05},
        progress=False,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=EPOCHS * config.steps_per_epoch(batches)
    )
    state = {"epoch": 1, "batch": 0}

    def train_step(x, y):
        state["batch"] += 1
        if state["batch"] > len(batches):
            state["epoch"], state["batch"] = state["epoch"] + 1, 1
        if calls is not None:
            calls.append(1)
        if fail_at == (state["epoch"], state["batch"]):
            raise Interrupt
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if nan_at == (state["epoch"], state["batch"]):
            loss = torch.tensor(float("nan"))
        return {"loss": loss, "acc": (logits.argmax(1) == y).float().mean()}

    def evaluate(epoch):
        return {"eval_epoch": float(epoch)}

    history = fit(
        modules={"model": model},
        optimizers={"sgd": optimizer},
        schedulers={"cosine": scheduler},
        train_step=train_step,
        batches=batches,
        config=config,
        evaluate=evaluate,
    )
    return model, history


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_batches_plain_yields_all_images_in_unit_range(real_uint8):
    images, labels = real_uint8
    batches = Batches(images, labels, 24, shuffle=False)
    assert len(batches) == 3  # 24 + 24 + 16
    xs, ys = zip(*batches, strict=True)
    assert [x.shape for x in xs] == [(24, 3, 32, 32), (24, 3, 32, 32), (16, 3, 32, 32)]
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, images.float() / 255) and torch.equal(y, labels)
    assert len(Batches(images, labels, 24, shuffle=False, drop_last=True)) == 2


def test_batches_shuffle_is_a_seeded_permutation(real_uint8):
    images, labels = real_uint8

    def order(seed):
        gen = torch.Generator().manual_seed(seed)
        xs = [x for x, _ in Batches(images, labels, 16, shuffle=True, generator=gen)]
        return torch.cat(xs)

    a, b, c = order(1), order(1), order(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every image exactly once: same multiset of per-image pixel sums
    sums = (images.float() / 255).sum((1, 2, 3))
    assert torch.allclose(a.sum((1, 2, 3)).sort().values, sums.sort().values)


def test_batches_augment_is_reflect_padded_crop_plus_flip(real_uint8):
    images, labels = real_uint8
    gen = torch.Generator().manual_seed(0)
    batches = Batches(images, labels, 32, shuffle=False, generator=gen, augment=True)
    x = torch.cat([xb for xb, _ in batches])
    assert x.shape == (N_IMAGES, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    padded = F.pad(images.float() / 255, (4, 4, 4, 4), mode="reflect")
    flips, shifts = 0, set()
    for i in range(N_IMAGES):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(
                x[i],
                padded[i, :, dy : dy + 32, dx : dx + 32].flip(2)
                if flip
                else padded[i, :, dy : dy + 32, dx : dx + 32],
            )
        ]
        assert matches, f"augmented image {i} is not a reflect-padded crop (+flip) of its source"
        flips += matches[0][2]
        shifts.add(matches[0][:2])
    assert 10 < flips < 54  # about half flipped
    assert len(shifts) > 20  # offsets vary per image


def test_batches_channels_last_and_bad_input(real_uint8):
    images, labels = real_uint8
    x, _ = next(iter(Batches(images, labels, 8, shuffle=False, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="uint8"):
        Batches(images.float(), labels, 8, shuffle=False)
    with pytest.raises(ValueError, match="labels"):
        Batches(images, labels[:-1], 8, shuffle=False)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(images, labels, 0, shuffle=False)


def test_seeded_run_is_deterministic_and_history_is_complete(real_uint8):
    model_a, history_a = _run(real_uint8)
    model_b, history_b = _run(real_uint8)
    assert _same_weights(model_a, model_b)
    assert [row["loss"] for row in history_a] == [row["loss"] for row in history_b]
    assert [row["epoch"] for row in history_a] == [1, 2, 3]
    assert set(history_a[0]) == {"epoch", "loss", "acc", "lr", "seconds", "eval_epoch"}
    # lr used by each epoch's last step: cosine stepped once per batch over 12 steps
    steps = N_IMAGES // BATCH
    for row in history_a:
        last_step = row["epoch"] * steps - 1
        expected = 0.05 * (1 + math.cos(math.pi * last_step / (EPOCHS * steps))) / 2
        assert row["lr"] == pytest.approx(expected)
    assert all(row["eval_epoch"] == row["epoch"] for row in history_a)


def test_interrupted_run_resumes_and_matches_uninterrupted(real_uint8, tmp_path):
    reference, reference_history = _run(real_uint8)
    with pytest.raises(KeyboardInterrupt):
        _run(real_uint8, tmp_path, fail_at=(2, 2))
    saved = load_safe(tmp_path / "resume.pt")
    assert saved["epoch"] == 1
    calls: list[int] = []
    resumed, history = _run(real_uint8, tmp_path, calls=calls)
    assert len(calls) == 2 * (N_IMAGES // BATCH)  # only epochs 2 and 3 ran
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [row["loss"] for row in history] == [row["loss"] for row in reference_history]
    assert _same_weights(resumed, reference)
    assert not (tmp_path / "resume.pt").exists()  # removed after success


def test_non_finite_loss_raises_and_keeps_last_good_checkpoint(real_uint8, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"'loss' is nan at epoch 2, batch 3"):
        _run(real_uint8, tmp_path, nan_at=(2, 3))
    assert load_safe(tmp_path / "resume.pt")["epoch"] == 1


def test_mismatched_fingerprint_starts_over(real_uint8, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(real_uint8, tmp_path, fail_at=(2, 1))
    calls: list[int] = []
    _, history = _run(real_uint8, tmp_path, fingerprint={"lr": 0.1}, calls=calls)
    assert len(calls) == EPOCHS * (N_IMAGES // BATCH)
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_corrupted_resume_file_raises_checkpoint_error(real_uint8, tmp_path):
    (tmp_path / "resume.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupted"):
        _run(real_uint8, tmp_path)


def test_max_batches_per_epoch_caps_the_epoch(real_uint8):
    images, labels = real_uint8
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    calls: list[int] = []

    def train_step(x, y):
        calls.append(len(x))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    config = LoopConfig(epochs=2, max_batches_per_epoch=2, progress=False, sync_every=3)
    history = fit(
        modules={"model": model},
        optimizers={"sgd": optimizer},
        train_step=train_step,
        batches=Batches(images, labels, 8, shuffle=True),
        config=config,
    )
    assert calls == [8, 8, 8, 8] and len(history) == 2


def test_train_step_without_loss_is_rejected(real_uint8):
    model = TinyNet()
    with pytest.raises(ValueError, match="'loss'"):
        fit(
            modules={"model": model},
            optimizers={"sgd": torch.optim.SGD(model.parameters(), lr=0.01)},
            train_step=lambda x, y: {"acc": 1.0},
            batches=Batches(*real_uint8, 16, shuffle=False),
            config=LoopConfig(epochs=1, progress=False),
        )


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def _conv_output_dtype(**autocast_kwargs) -> torch.dtype:
    torch.manual_seed(0)
    conv, x = nn.Conv2d(3, 4, 3), torch.rand(2, 3, 8, 8)
    with autocast("cpu", **autocast_kwargs):
        return conv(x).dtype


@pytest.mark.skipif(not bf16_available("cpu"), reason="this CPU has no bf16 units")
def test_cpu_autocast_is_bf16_on_a_cpu_with_bf16_units():
    assert _conv_output_dtype() == torch.bfloat16
    assert _conv_output_dtype(enabled=False) == torch.float32
    # a torch.device works as well as its type name, and nothing leaks out of the block
    with autocast(torch.device("cpu")):
        assert nn.Linear(4, 2)(torch.rand(3, 4)).dtype == torch.bfloat16
    assert nn.Linear(4, 2)(torch.rand(3, 4)).dtype == torch.float32


def test_cpu_autocast_is_float32_without_bf16_units(monkeypatch):
    monkeypatch.setattr(training, "bf16_available", lambda device_type: False)
    assert _conv_output_dtype() == torch.float32
    assert not bf16_available("meta")  # neither CUDA nor CPU: never


def test_accuracy_judges_in_float32(real_uint8):
    """No ``amp`` switch: the judging forward pass is float32 even where bf16 autocast is on."""
    assert "amp" not in inspect.signature(accuracy).parameters
    seen: list[torch.dtype] = []

    class Probe(TinyNet):
        def forward(self, x):
            logits = super().forward(x)
            seen.append(logits.dtype)
            return logits

    torch.manual_seed(0)
    model = Probe().eval()
    images, labels = real_uint8
    acc = accuracy(model, images, labels, batch_size=32)
    assert seen == [torch.float32, torch.float32]
    with torch.no_grad():
        expected = (model(images.float() / 255).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(expected)


class FakeTerminal(io.StringIO):
    """A standard error that says it is an interactive terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bars_draw_nothing_off_a_terminal(capsys):
    assert not sys.stderr.isatty()  # pytest captures it
    bar = progress(range(5), True, desc="epochs")
    assert bar.disable and list(bar) == [0, 1, 2, 3, 4]
    bar.close()
    assert capsys.readouterr().err == ""


def test_progress_bars_are_drawn_on_a_terminal_when_asked(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress(range(3), True, desc="epochs")) == [0, 1, 2]
    assert "epochs" in terminal.getvalue()
    drawn = terminal.getvalue()
    assert list(progress(range(3), False, desc="quiet")) == [0, 1, 2]  # not asked for
    assert terminal.getvalue() == drawn
