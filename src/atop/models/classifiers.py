"""The classifier zoo ``f`` of the defense ``f(g(t(x)))`` (paper §3-4) and its checkpoints.

One registry builds every architecture from a config name, as timm's ``create_model``::

    model = build_classifier("wrn-28-10", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD)

Names (:data:`CLASSIFIERS`):

* ``"wrn-28-10"``, ``"wrn-34-10"``, ``"wrn-70-16"``: WideResNet (Zagoruyko & Komodakis 2016),
  the paper's CIFAR classifiers (WRN-28-10, WRN-70-16) and RvS's (WRN-34-10). ``depth``,
  ``widen_factor`` and ``dropout`` can be overridden (small ones make fast tests).
* ``"preact-resnet18"``: pre-activation ResNet-18 (He et al. 2016), the usual CIFAR
  adversarial-training baseline.
* ``"resnet-fast"``: a narrow ResNet-9 (the DAWNBench design of D. Page: three conv stages,
  two residual blocks, max-pool downsampling, scaled logits) sized for the 2-core CPU
  profile (``width=16``: ~80 % CIFAR-10 test accuracy in ~10 minutes of CPU training).
* ``"resnet18"``, ``"resnet34"``, ``"resnet50"``: torchvision's ImageNet ResNets
  (``weights=None``), for ImageNette at 224 px.

The input contract is the project's: **float32 images in [0, 1], NCHW, 3 channels**. Every
classifier normalizes inside with a per-channel ``mean``/``std`` held as buffers (saved in
the state dict), so attacks (torchattacks) and the purifier work in pixel space. A cheap
check rejects inputs outside [0, 1] (``model.check_range = False`` turns it off).

Penultimate features without a second forward pass: ``model(x)`` returns logits
``[B, num_classes]``; ``model(x, return_features=True)`` returns ``(logits, features)``
with features float ``[B, model.feature_dim]`` (the pooled input of the final linear layer;
RvS's optimal-transport term uses them).

Core module: imports only torch and torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from atop.checkpoint import CheckpointError, check_values

#: Per-channel statistics of the training splits, (mean, std) on the [0, 1] scale.
DATASET_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

#: Tolerance of the [0, 1] input check (float rounding of upstream arithmetic).
RANGE_TOLERANCE = 1e-5


class ImageClassifier(nn.Module):
    """Base of every classifier: [0, 1] input check, normalization, features + head.

    Subclasses implement :meth:`embed` (normalized images -> features ``[B, feature_dim]``)
    and set ``self.head`` (the final ``nn.Linear``) and ``self.feature_dim``.

    Args:
        mean: per-channel mean on the [0, 1] scale (3 floats).
        std: per-channel standard deviation on the [0, 1] scale (3 positive floats).
        check_range: raise ``ValueError`` on inputs outside [0, 1] (one min/max reduction;
            on CUDA it synchronizes, set ``False`` where every microsecond counts).

    Raises:
        ValueError: ``mean``/``std`` do not have 3 entries or ``std`` is not positive.
    """

    feature_dim: int
    head: nn.Linear

    def __init__(
        self,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        check_range: bool = True,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(
                f"mean and std need 3 per-channel values with std > 0, got mean={list(mean)}, "
                f"std={list(std)}; see atop.models.classifiers.DATASET_STATS."
            )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.check_range = check_range

    def embed(self, x: Tensor) -> Tensor:
        """Normalized images ``[B, 3, H, W]`` -> penultimate features ``[B, feature_dim]``."""
        raise NotImplementedError

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Classify images.

        Args:
            x: float ``[B, 3, H, W]`` in [0, 1] (any spatial size the architecture accepts).
            return_features: also return the penultimate features.

        Returns:
            logits ``[B, num_classes]``, or ``(logits, features [B, feature_dim])``.

        Raises:
            ValueError: ``x`` is not a float ``[B, 3, H, W]`` tensor, or (with
                ``check_range``) has values outside [0, 1].
        """
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"Classifier input must be float [B, 3, H, W] in [0, 1], got {x.dtype} "
                f"{tuple(x.shape)}. Convert uint8 images with `x.float() / 255`."
            )
        if self.check_range:
            low, high = torch.aminmax(x.detach())
            if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
                raise ValueError(
                    f"Classifier input must lie in [0, 1], got values in [{low.item():.4g}, "
                    f"{high.item():.4g}]. Pass unnormalized pixels (the model normalizes "
                    "inside) and clamp after adding noise; set `model.check_range = False` "
                    "to skip this check."
                )
        features = self.embed((x - self.mean) / self.std)
        logits = self.head(features)
        return (logits, features) if return_features else logits


# --------------------------------------------------------------------------- WideResNet


class _WideBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + skip


class WideResNet(ImageClassifier):
    """WideResNet-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016) for 32x32 images.

    Three stages of ``(depth - 4) / 6`` pre-activation blocks with widths 16k, 32k, 64k
    (strides 1, 2, 2), then BN-ReLU, global average pooling (features ``[B, 64k]``) and a
    linear head. WRN-28-10 has 36.5 M parameters.

    Args:
        num_classes: number of outputs.
        depth: 6n + 4 (28, 34, 70, or 10/16 for tests).
        widen_factor: k.
        dropout: dropout probability between the two convs of a block.
        mean, std, check_range: see :class:`ImageClassifier`.

    Raises:
        ValueError: ``depth`` is not 6n + 4 with n >= 1, or ``widen_factor`` < 1.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        **normalization: Any,
    ) -> None:
        super().__init__(**normalization)
        if depth < 10 or (depth - 4) % 6 != 0 or widen_factor < 1:
            raise ValueError(
                f"WideResNet needs depth = 6n + 4 (10, 16, 28, 34, 70, ...) and widen_factor "
                f">= 1, got depth={depth}, widen_factor={widen_factor}."
            )
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for stage, stride in enumerate((1, 2, 2)):
            for i in range(n):
                cin = widths[stage] if i == 0 else widths[stage + 1]
                blocks.append(_WideBlock(cin, widths[stage + 1], stride if i == 0 else 1, dropout))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]
        self.head = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def embed(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn(self.blocks(self.stem(x))))
        return out.mean(dim=(2, 3))


# ----------------------------------------------------------------- PreAct ResNet-18


class _PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings")."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return out + skip


class PreActResNet18(ImageClassifier):
    """Pre-activation ResNet-18 for 32x32 images (features ``[B, 8 * width]``).

    Args:
        num_classes: number of outputs.
        width: channels of the first stage (64 in the original; stages 1x, 2x, 4x, 8x).
        mean, std, check_range: see :class:`ImageClassifier`.
    """

    def __init__(self, num_classes: int, width: int = 64, **normalization: Any) -> None:
        super().__init__(**normalization)
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**stage
            blocks += [_PreActBlock(cin, cout, stride), _PreActBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)
        _init_weights(self)

    def embed(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.blocks(self.stem(x)))).mean(dim=(2, 3))


# --------------------------------------------------------------------- fast ResNet


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.insert(1, nn.MaxPool2d(2))  # pool before BN: 4x cheaper BN
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FastResNet(ImageClassifier):
    """A narrow ResNet-9 (D. Page's DAWNBench design) for fast CPU training on 32x32 images.

    prep conv(w) -> [conv(2w), pool, residual x2] -> conv(4w), pool ->
    [conv(8w), pool, residual x2] -> global max pool (features ``[B, 8w]``) -> linear,
    logits multiplied by ``logit_scale`` (0.125 in Page's design: keeps the softmax
    soft early in training).

    Args:
        num_classes: number of outputs.
        width: channels of the first conv (64 in Page's; 16 for the 2-core CPU profile).
        logit_scale: factor on the logits.
        mean, std, check_range: see :class:`ImageClassifier`.
    """

    def __init__(
        self, num_classes: int, width: int = 16, logit_scale: float = 0.125, **normalization: Any
    ) -> None:
        super().__init__(**normalization)
        w = width
        self.body = nn.Sequential(
            _conv_bn(3, w),
            _conv_bn(w, 2 * w, pool=True),
            _Residual(2 * w),
            _conv_bn(2 * w, 4 * w, pool=True),
            _conv_bn(4 * w, 8 * w, pool=True),
            _Residual(8 * w),
        )
        self.feature_dim = 8 * w
        self.head = nn.Linear(8 * w, num_classes)
        self.logit_scale = logit_scale
        _init_weights(self)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(x).amax(dim=(2, 3))

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        logits, features = super().forward(x, return_features=True)
        logits = logits * self.logit_scale
        return (logits, features) if return_features else logits


# --------------------------------------------------------------- torchvision ResNets


class TorchvisionResNet(ImageClassifier):
    """A torchvision ResNet (``weights=None``) behind the project's input contract.

    Features are the global-average-pooled output of ``layer4`` (``[B, 512]`` for
    resnet18/34, ``[B, 2048]`` for resnet50). Made for 224x224 ImageNette images.

    Args:
        num_classes: number of outputs.
        depth: 18, 34 or 50.
        mean, std, check_range: see :class:`ImageClassifier`.
        **kwargs: passed to ``torchvision.models.resnet<depth>`` (e.g. ``zero_init_residual``).
    """

    _FACTORIES: dict[int, Callable[..., torchvision.models.ResNet]] = {
        18: torchvision.models.resnet18,
        34: torchvision.models.resnet34,
        50: torchvision.models.resnet50,
    }

    def __init__(
        self,
        num_classes: int,
        depth: int = 18,
        mean: Sequence[float] = DATASET_STATS["imagenette"][0],
        std: Sequence[float] = DATASET_STATS["imagenette"][1],
        check_range: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(mean=mean, std=std, check_range=check_range)
        if depth not in self._FACTORIES:
            raise ValueError(f"torchvision ResNet depth must be 18, 34 or 50, got {depth}.")
        self.net = self._FACTORIES[depth](weights=None, num_classes=num_classes, **kwargs)
        self.head = self.net.fc
        self.feature_dim = self.net.fc.in_features

    def embed(self, x: Tensor) -> Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), unit BN, zero linear bias (as in the WRN code)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------- registry

#: name -> (class, default keyword arguments).
_REGISTRY: dict[str, tuple[type[ImageClassifier], dict[str, Any]]] = {
    "wrn-28-10": (WideResNet, {"depth": 28, "widen_factor": 10}),
    "wrn-34-10": (WideResNet, {"depth": 34, "widen_factor": 10}),
    "wrn-70-16": (WideResNet, {"depth": 70, "widen_factor": 16}),
    "preact-resnet18": (PreActResNet18, {}),
    "resnet-fast": (FastResNet, {}),
    "resnet18": (TorchvisionResNet, {"depth": 18}),
    "resnet34": (TorchvisionResNet, {"depth": 34}),
    "resnet50": (TorchvisionResNet, {"depth": 50}),
}

#: Every architecture name :func:`build_classifier` accepts.
CLASSIFIERS: tuple[str, ...] = tuple(_REGISTRY)


def build_classifier(name: str, num_classes: int, **kwargs: Any) -> ImageClassifier:
    """Build a classifier from its registry name (see the module docstring).

    Args:
        name: one of :data:`CLASSIFIERS`.
        num_classes: number of outputs (10 for CIFAR-10 and ImageNette, 100 for CIFAR-100).
        **kwargs: overrides of the architecture's defaults (``depth``, ``widen_factor``,
            ``dropout``, ``width``, ...) and of the normalization (``mean``, ``std``,
            ``check_range``).

    Returns:
        The model (random weights, train mode). Input float ``[B, 3, H, W]`` in [0, 1];
        output logits ``[B, num_classes]`` (``return_features=True`` adds the features).

    Raises:
        ValueError: unknown name, ``num_classes`` < 2, or invalid architecture options.
        TypeError: an option the architecture does not have.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown classifier '{name}'; choose one of {list(CLASSIFIERS)}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    cls, defaults = _REGISTRY[name]
    return cls(num_classes=num_classes, **{**defaults, **kwargs})


def classifier_checkpoint(
    model: nn.Module, arch: str, config: dict[str, Any], meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Package a classifier as the project's checkpoint dict (docs/architecture.md).

    Args:
        model: the trained classifier (any device).
        arch: its registry name.
        config: the keyword arguments that rebuild it: ``build_classifier(arch, **config)``
            (so it holds ``num_classes``); primitives only (lists, not tuples).
        meta: free-form primitives (accuracy, epochs, dataset, ...).

    Returns:
        ``{"arch": str, "config": dict, "state_dict": {name: CPU tensor}, "meta": dict}``,
        loadable with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: unknown ``arch`` or ``config`` without ``num_classes``.
    """
    if arch not in _REGISTRY:
        raise ValueError(f"Unknown classifier '{arch}'; choose one of {list(CLASSIFIERS)}.")
    if "num_classes" not in config:
        raise ValueError("config must hold 'num_classes' (and every non-default option).")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"arch": arch, "config": dict(config), "state_dict": state, "meta": dict(meta or {})}


def load_classifier(
    ckpt: dict[str, Any],
    device: torch.device | str = "cpu",
    expected_arch: str | None = None,
    channels_last: bool = False,
) -> ImageClassifier:
    """Rebuild a classifier from a :func:`classifier_checkpoint` dict.

    Args:
        ckpt: the checkpoint dict (e.g. the catalog's ``classifier``).
        device: where to put the model.
        expected_arch: if given, the checkpoint's ``arch`` must equal it.
        channels_last: NHWC weights, so the convolutions run channels-last whatever the
            input's layout: resnet-fast's forward-backward is 2.1x faster on the 2-core CPU
            (oneDNN), with bit-identical logits and input gradients under bf16 autocast and
            differences of about 1e-6 in float32 (docs/benchmarks.md, "The classifier in
            channels-last").

    Returns:
        The model in eval mode, on ``device``.

    Raises:
        CheckpointError: the dict lacks ``arch``/``config``/``state_dict``, names an unknown
            or unexpected architecture, or its weights do not fit the architecture (the
            message lists missing and unexpected keys).
    """
    missing = [key for key in ("arch", "config", "state_dict") if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"Not a classifier checkpoint: keys {missing} are missing (has {sorted(ckpt)}). "
            "Create it with atop.models.classifier_checkpoint."
        )
    arch = ckpt["arch"]
    if arch not in _REGISTRY:
        raise CheckpointError(
            f"Checkpoint architecture '{arch}' is unknown; known: {list(CLASSIFIERS)}."
        )
    if expected_arch is not None and arch != expected_arch:
        raise CheckpointError(
            f"Checkpoint holds a '{arch}' classifier but '{expected_arch}' was expected: "
            "point the catalog at the right file or change the `arch` parameter."
        )
    check_values(ckpt["state_dict"], ckpt["config"], "classifier", {"num_classes": 100_000})
    try:
        model = build_classifier(arch, **ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"Cannot rebuild '{arch}' from config {ckpt['config']}: {exc}"
        ) from exc
    try:
        result = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(
            f"Checkpoint weights do not fit '{arch}' with config {ckpt['config']}: {exc}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"Checkpoint weights do not fit '{arch}' with config {ckpt['config']}: missing "
            f"{result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''}."
        )
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model
