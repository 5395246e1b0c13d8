"""The one home of the in-memory data conventions: seeded index subsets and the uint8 cast.

* A split is ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}`` (docs/architecture.md).
* :func:`to_unit` is the only uint8 -> float32 ``[0, 1]`` conversion of the project.
* :func:`random_split` / :func:`random_subset` draw every fixed random subset (training
  slices, held-out images, the evaluation subset) from one seeded permutation, optionally
  excluding indices (e.g. the evaluation subset), so they are identical across runs and
  machines and can be made disjoint by construction.

Core module: torch only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def to_unit(images_uint8: Tensor) -> Tensor:
    """uint8 ``[..., H, W]`` (0..255) -> float32 in ``[0, 1]`` (a new tensor)."""
    return images_uint8.float().div_(255.0)


def take(split: dict[str, Tensor], index: Tensor | Sequence[int]) -> dict[str, Tensor]:
    """The images and labels of ``split`` at ``index`` (same layout)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    return {"images": split["images"][index], "labels": split["labels"][index]}


def _candidates(n: int, exclude: Iterable[int] | None) -> Tensor:
    if exclude is None:
        return torch.arange(n)
    mask = torch.ones(n, dtype=torch.bool)
    excluded = torch.as_tensor(list(exclude), dtype=torch.int64)
    if len(excluded) and (excluded.min() < 0 or excluded.max() >= n):
        raise ValueError(f"Excluded indices must lie in [0, {n}): rerun data_ingestion.")
    mask[excluded] = False
    return mask.nonzero().squeeze(1)


def random_split(
    n: int, sizes: Sequence[int], seed: int, *, exclude: Iterable[int] | None = None
) -> list[Tensor]:
    """Consecutive, disjoint chunks of one seeded permutation of ``range(n)`` minus ``exclude``.

    Args:
        n: number of items.
        sizes: chunk sizes (each >= 1), in order.
        seed: seed of the permutation (a private generator: the global RNG is untouched).
        exclude: indices never drawn.

    Returns:
        int64 tensors in draw order (not sorted), pairwise disjoint.

    Raises:
        ValueError: a size < 1 or more items asked for than there are candidates.
    """
    candidates = _candidates(n, exclude)
    if any(int(s) < 1 for s in sizes) or sum(sizes) > len(candidates):
        raise ValueError(
            f"Cannot draw disjoint subsets of sizes {list(sizes)} from {len(candidates)} "
            f"items ({n} minus {n - len(candidates)} excluded): lower the sizes."
        )
    order = candidates[
        torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    ]
    chunks, start = [], 0
    for size in sizes:
        chunks.append(order[start : start + int(size)])
        start += int(size)
    return chunks


def random_subset(
    n: int,
    size: int | None,
    seed: int,
    *,
    exclude: Iterable[int] | None = None,
    sort: bool = True,
) -> Tensor:
    """A fixed random subset of ``size`` indices of ``range(n)`` minus ``exclude``.

    Args:
        n: number of items.
        size: subset size (>= 1); ``None`` or at least the number of candidates = every
            candidate, in increasing order.
        seed: seed of the draw.
        exclude: indices never drawn.
        sort: return the indices sorted (else in draw order).

    Returns:
        int64 ``[size]``.

    Raises:
        ValueError: ``size < 1``.
    """
    if size is not None and size < 1:
        raise ValueError(f"A subset must hold at least one item or be null (all), got {size}.")
    candidates = _candidates(n, exclude)
    if size is None or size >= len(candidates):
        return candidates
    (chunk,) = random_split(n, [size], seed, exclude=exclude)
    return chunk.sort().values if sort else chunk
