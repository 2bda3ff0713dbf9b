"""RemOve And Retrain (ROAR, Hooker et al., 2019) with a linear probe on frozen CLIP features.

For each share k of pixels removed (k in {0.1, …, 0.9} by default), the top-k pixels of every image's saliency map
are replaced by the dataset's per-channel mean colour, the frozen encoder embeds the modified images, and a linear
probe is retrained from scratch on the modified training images and tested on the modified test images. The faster
the accuracy falls as k grows, the better the maps find the pixels the features depend on (**lower accuracy at a
given k means a more faithful map**); retraining rules out the shift to modified images as the cause of the drop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import top_fraction_mask
from .zero_shot import top1_accuracy

ROAR_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def remove_top_pixels(pixels: torch.Tensor, maps: torch.Tensor, fraction: float, fill: torch.Tensor) -> torch.Tensor:
    """`pixels` ``(B, 3, H, W)`` with the top `fraction` of each map's pixels set to `fill` (``(3,)``, in [0, 1])."""
    selected = top_fraction_mask(maps, fraction).unsqueeze(1)
    return torch.where(selected, fill.to(pixels).view(1, -1, 1, 1), pixels)


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> torch.nn.Linear:
    """Multinomial logistic regression on L2-normalised `features` ``(N, D)``, fitted by full-batch L-BFGS.

    Deterministic given its inputs (zero initialisation). `weight_decay` is the L2 penalty on the weights.
    """
    inputs = F.normalize(features.float(), dim=-1)
    probe = torch.nn.Linear(inputs.shape[1], num_classes).to(inputs.device)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(inputs), labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe


@torch.no_grad()
def probe_accuracy(probe: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of `probe` on L2-normalised `features` ``(N, D)``."""
    return top1_accuracy(probe(F.normalize(features.float(), dim=-1)).argmax(dim=-1), labels)


def split_indices(num_items: int, test_share: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``range(num_items)`` into (train, test) index tensors, each non-empty."""
    if num_items < 2:
        raise ValueError(f"ROAR needs at least 2 images to split into probe training and test sets; got {num_items}.")
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    num_test = min(max(round(test_share * num_items), 1), num_items - 1)
    return order[num_test:], order[:num_test]


def roar_accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    train_index: torch.Tensor,
    test_index: torch.Tensor,
) -> float:
    """Test accuracy of a linear probe retrained on the training rows of `features` (one ROAR point)."""
    probe = train_linear_probe(features[train_index], labels[train_index], num_classes)
    return probe_accuracy(probe, features[test_index], labels[test_index])
