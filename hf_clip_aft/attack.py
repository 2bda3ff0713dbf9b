"""The inner maximisation of AFT: PGD on the embedding distance, with randomised smoothing and a norm penalty.

All budgets are given **in units of 1/255** (``attack_eps=4`` means ε = 4/255 in pixel space [0, 1]), as the
community writes them. The function is pure: it reads the budgets from any object with the attributes below (an
:class:`~hf_clip_aft.AFTConfig` or a `types.SimpleNamespace`), touches no model parameter, and returns detached
adversarial pixels. Freezing the parameters during the attack is the caller's business
(:func:`hf_clip_aft.modeling.frozen_parameters`), because only the caller knows which module holds them.

Where the paper's text and the official training code (github.com/peterant330/CLIP_AFT) differ, the default follows
the paper and a setting gives the official behaviour: ``docs/official_parity.md`` lists every difference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .modeling import EmbedFn

ATTACK_NORMS = ("huber", "linf", "l2", "elastic", "group")
ELASTIC_RULES = ("library", "official")
# The official PGD's momentum (train/pgd_train.py:18); used by the rules that come from that code only.
OFFICIAL_MOMENTUM = 0.9
# The step only uses the gradient's direction, so the objective is scaled before differentiating. Under fp16 autocast
# the backward's activation gradients are otherwise subnormal (a random ViT-B/16: at most 3.1e-5 at batch 1, 3.1e-6
# at batch 8, below fp16's smallest normal 6.1e-5; benchmarks/fp16_attack_gradient.py) and lose their low bits; 2^16
# lifts them into the normal range with ~2^15 headroom below fp16's maximum. A power of two, so fp32 and bf16 steps
# are bit-identical with or without it.
OBJECTIVE_SCALE = 2.0**16


class AttackSettings(Protocol):
    attack_eps: float  # radius ε, in units of 1/255
    attack_step_size: float  # PGD step α, in units of 1/255
    attack_steps: int  # number of PGD steps K
    attack_eta: float  # penalty scale η, in units of 1/255
    noise_sigma: float  # std σ of the smoothing noise, in units of 1/255
    attack_norm: str  # one of ATTACK_NORMS
    # Optional (read with a default, so that older settings objects keep working):
    #   attack_group_size: int | None   side of the `group` norm's square blocks, in pixels (no default: required)
    #   elastic_rule: str               "library" (default) or "official"
    #   attack_momentum: float | None   None (default): see resolve_momentum
    #   clamp_random_start: bool        True (default): project the random start, see adversarial_perturbation


@dataclass(frozen=True)
class ExampleRandomness:
    """Whose random draws each row of a batch gets: every example its own, from (seed, epoch, index, draw).

    With it, an example's random start and smoothing noise do not depend on which other examples share its batch,
    how the batch is split across processes, or the order the batches come in: 1 process × batch 8, 2 × 4 and
    8 × 1 with gradient accumulation draw the same numbers for the same example. Without it the attack draws from
    torch's global generator, whose stream depends on all of that.

    Args:
        seed: the run's seed (``AFTConfig.seed``).
        epoch: the training epoch (0-based); the same example gets fresh draws every epoch.
        indices: each row's example index in its dataset (``(B,)`` integers, any device).
    """

    seed: int
    epoch: int
    indices: Sequence[int] | torch.Tensor

    def draw_seed(self, index: int, draw: int) -> int:
        """The generator seed of one draw of one example: a 64-bit hash of (seed, epoch, index, draw).

        ``draw`` 0 is the random start, ``k`` ≥ 1 the smoothing noise of attack step k. (CPU generators keep the low
        32 bits: two draws may then share their numbers, about one pair in 4·10⁹, which biases nothing.)
        """
        key = b"hf_clip_aft.attack/" + ",".join(map(str, (self.seed, self.epoch, index, draw))).encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def _draw(
    like: torch.Tensor,
    randomness: ExampleRandomness | None,
    draw: int,
    fill: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor],
) -> torch.Tensor:
    """A tensor shaped like `like`, filled in place by ``fill(tensor, generator)``: row by row from each example's
    own generator with `randomness`, in one go from the global generator without it."""
    out = torch.empty_like(like)
    if randomness is None:
        fill(out, None)
        return out
    indices = randomness.indices.tolist() if isinstance(randomness.indices, torch.Tensor) else randomness.indices
    if len(indices) != len(out):
        raise ValueError(f"ExampleRandomness has {len(indices)} example indices for a batch of {len(out)} images.")
    # Reseeding one generator costs microseconds (a CPU Mersenne twister's state, a CUDA Philox seed): much less
    # than the draw itself, which is as large as with one global draw.
    generator = torch.Generator(device=like.device)
    for row, index in zip(out, indices):
        generator.manual_seed(randomness.draw_seed(int(index), draw))
        fill(row, generator)
    return out


def resolve_momentum(norm: str, elastic_rule: str, momentum: float | None) -> float:
    """The PGD momentum μ of a run: `momentum` when given, else the rule's own source.

    None gives 0.9 for ``group`` and for ``elastic`` under ``elastic_rule="official"`` (both exist only in the official
    code, which always steps with momentum 0.9) and 0 (plain PGD, the paper's text) for everything else.
    """
    if momentum is not None:
        return momentum
    official = norm == "group" or (norm == "elastic" and elastic_rule == "official")
    return OFFICIAL_MOMENTUM if official else 0.0


def embedding_distance(embeds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance per example, ``||e - e0||²`` summed over the embedding: shape ``(B,)``."""
    return (embeds - target).pow(2).sum(dim=-1)


def norm_penalty(delta: torch.Tensor, norm: str, eps: float, eta: float, elastic_rule: str = "library") -> torch.Tensor:
    """The penalty P(δ) subtracted from the inner objective (ε, η in pixel units, i.e. already divided by 255).

    - ``huber``: ``(η/ε) · mean over batch and pixels of ||δ_pixel||₂`` (L2 over the colour channels);
    - ``elastic``, ``elastic_rule="library"``: ``(1/(4η)) · Σ (|δ| − ε)₊²`` per image, mean over the batch: only the
      elements outside the box [−ε, ε] are penalised;
    - ``elastic``, ``elastic_rule="official"``: ``(1/(4η)) · Σ (|δ| − ε)²`` per image, mean over the batch, over every
      element, inside the box too (train/pgd_train.py:38 clamps after squaring, which never acts);
    - ``linf``, ``l2`` and ``group``: 0 (the budget is a hard projection instead).
    """
    if norm == "huber":
        return (eta / eps) * torch.linalg.vector_norm(delta, dim=1).mean()
    if norm == "elastic":
        gap = delta.abs() - eps
        if elastic_rule == "library":
            gap = gap.clamp(min=0)
        return (gap.pow(2).flatten(1).sum(dim=1) / (4 * eta)).mean()
    return delta.new_zeros(())


def inner_objective(
    embed_fn: EmbedFn,
    pixels: torch.Tensor,
    delta: torch.Tensor,
    target_embeds: torch.Tensor,
    norm: str,
    eps: float,
    eta: float,
    elastic_rule: str = "library",
) -> torch.Tensor:
    """L_in(δ) = mean over the batch of ``||f(pixels + δ) − e0||²`` minus the norm penalty (a scalar)."""
    penalty = norm_penalty(delta, norm, eps, eta, elastic_rule)
    return embedding_distance(embed_fn(pixels + delta), target_embeds).mean() - penalty


def _l2_renorm(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each image's δ down to L2 norm ``radius`` when it is larger."""
    norms = torch.linalg.vector_norm(delta.flatten(1), dim=1).view(-1, 1, 1, 1)
    return delta * (radius / norms.clamp(min=1e-12)).clamp(max=1.0)


def check_group_size(group_size: int | None, height: int, width: int) -> int:
    """`group_size` (pixels) when it divides the image; a ValueError naming both sizes otherwise."""
    if group_size is None:
        raise ValueError(
            "attack_norm='group' needs attack_group_size (pixels): AFTTrainer fills in the model's patch size; "
            "set it yourself when calling adversarial_perturbation directly."
        )
    if group_size < 1 or height % group_size or width % group_size:
        raise ValueError(
            f"attack_group_size={group_size} px does not divide the image size {height}×{width} px: set "
            f"attack_group_size to a divisor of both (the model's patch size always is one)."
        )
    return group_size


def _group_blocks(t: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W)`` viewed as ``(B, C, H/size, size, W/size, size)``: one block per patch and colour channel."""
    b, c, h, w = t.shape
    return t.reshape(b, c, h // size, size, w // size, size)


def group_norms(t: torch.Tensor, size: int) -> torch.Tensor:
    """The L2 norm of every non-overlapping ``size × size`` block of every channel: ``(B, C, H/size, W/size)``."""
    return torch.linalg.vector_norm(_group_blocks(t, size), dim=(3, 5))


def _group_scale(t: torch.Tensor, size: int, scale) -> torch.Tensor:
    """`t` with each block multiplied by ``scale(block norms)`` (shape ``(B, C, H/size, W/size)``)."""
    factor = scale(group_norms(t, size))[:, :, :, None, :, None]
    return (_group_blocks(t, size) * factor).reshape(t.shape)


def group_project(delta: torch.Tensor, radius: float, size: int) -> torch.Tensor:
    """Scale every block (patch × colour channel) whose L2 norm exceeds `radius` down to `radius`; others unchanged.

    The official code's ``group`` projection (train/utils.py:116-123) for any image size that `size` divides.
    """
    return _group_scale(delta, size, lambda norms: (radius / norms.clamp(min=1e-12)).clamp(max=1.0))


def group_normalize(grad: torch.Tensor, size: int) -> torch.Tensor:
    """`grad` divided by the L2 norm of its block (patch × colour channel): every block gets norm 1.

    The official ``group`` gradient normalisation (train/utils.py:142-146); an all-zero block stays zero here,
    where the official code divides 0 by 0.
    """
    return _group_scale(grad, size, lambda norms: 1 / norms.clamp(min=1e-12))


def _direction_kind(norm: str, elastic_rule: str) -> str:
    """How a norm normalises its steps: per block (``group``), per image (``l2``, official elastic), or the sign."""
    if norm == "group":
        return "group"
    if norm == "l2" or (norm == "elastic" and elastic_rule == "official"):
        return "l2"
    return "sign"


def _direction(grad: torch.Tensor, kind: str, group_size: int | None) -> torch.Tensor:
    """The ascent direction of `grad`: its sign, its per-image L2 normalisation, or its per-block one."""
    if kind == "l2":
        grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).view(-1, 1, 1, 1)
        return grad / grad_norm.clamp(min=1e-12)
    if kind == "group":
        return group_normalize(grad, group_size)
    return grad.sign()


def _project(delta: torch.Tensor, pixels: torch.Tensor, norm: str, eps: float, group_size: int | None) -> torch.Tensor:
    if norm == "l2":
        delta = _l2_renorm(delta, eps)
    elif norm == "group":
        delta = group_project(delta, eps, group_size)
    elif norm != "elastic":  # elastic is penalty-only: no box projection
        delta = delta.clamp(-eps, eps)
    return (pixels + delta).clamp(0, 1) - pixels


@dataclass(frozen=True)
class AttackOutcome:
    """What one attack returned: the adversarial pixels and the work each row cost.

    Attributes:
        pixels: ``x + δ*``, detached, in [0, 1], ``(B, 3, H, W)``.
        steps: ``(B,)`` ascent steps each row took; each is one forward and one backward to the input (two
            forward-equivalents). Fewer than K where early stopping ended a row's ascent.
    """

    pixels: torch.Tensor
    steps: torch.Tensor


def adversarial_perturbation(
    embed_fn: EmbedFn,
    pixels: torch.Tensor,
    target_embeds: torch.Tensor,
    config: AttackSettings,
    randomness: ExampleRandomness | None = None,
) -> torch.Tensor:
    """Adversarial pixels ``x + δ*`` (detached, in [0, 1]) that push ``embed_fn`` away from `target_embeds`.

    K = ``config.attack_steps`` steps of size α from a uniform random start δ₀ ~ U(−ε, ε). With
    ``clamp_random_start`` (default) δ₀ is first projected into the budget and x + δ₀ into [0, 1]; without it δ₀ is
    used as drawn (the official code). At each step a fresh Gaussian sample z ~ N(0, σ²) smooths the clean image
    (x̃ = clamp(x + z, 0, 1)), and with g the gradient of ``||f(x̃ + δ) − e0||² − P(δ)``:

        d = N(g);  with momentum μ > 0: v ← N(μ·v + d), d = v;  δ ← Π(δ + α·d)

    where N is the sign for ``huber``, ``linf`` and the library's ``elastic``, the L2 normalisation per image for
    ``l2`` and the official ``elastic``, and the L2 normalisation per block (patch × colour channel) for ``group``;
    Π projects onto the budget (box, L2 ball, per-block L2 balls of radius ε, nothing for elastic), then x + δ onto
    [0, 1]. This is the official update order (train/pgd_train.py:51-66). The returned image carries no noise.

    Args:
        embed_fn: ``pixels -> embeddings``; its parameters should be frozen by the caller.
        pixels: clean images ``(B, 3, H, W)`` in [0, 1]; for ``group``, H and W multiples of the group size.
        target_embeds: the frozen reference embeddings e0 ``(B, D)``.
        config: budgets in units of 1/255 (see :class:`AttackSettings`).
        randomness: draw each example's random start and noise from its own generator (:class:`ExampleRandomness`,
            what :class:`~hf_clip_aft.AFTTrainer` passes, so that a run does not depend on the number of processes).
            None draws from torch's global generator, for callers without example indices (``torch.manual_seed``
            then fixes the draws of a whole batch).
    """
    return projected_gradient_ascent(embed_fn, pixels, target_embeds, config, randomness).pixels


def projected_gradient_ascent(
    embed_fn: EmbedFn,
    pixels: torch.Tensor,
    target_embeds: torch.Tensor,
    config: AttackSettings,
    randomness: ExampleRandomness | None = None,
    *,
    start: torch.Tensor | None = None,
    carried: torch.Tensor | None = None,
    early_stop: bool = False,
) -> AttackOutcome:
    """:func:`adversarial_perturbation` with the options of the attack schedules (:mod:`hf_clip_aft.schedules`).

    Args:
        start: ``(B, 3, H, W)`` perturbations to start from instead of the random start, on the rows where
            `carried` ``(B,)`` is True (projected into the budget first); the other rows start at random as usual.
        early_stop: stop a row's ascent at the first step where its objective (at that step's noise) is not above
            the previous step's; the row then keeps the previous δ, and later steps skip it (no forward, no
            backward). Without it every row takes K steps, through exactly :func:`adversarial_perturbation`'s
            arithmetic.
    """
    rule = _rule(config, pixels)
    pixels = pixels.detach()
    target_embeds = target_embeds.detach()
    steps_taken = torch.zeros(len(pixels), dtype=torch.int64)
    if config.attack_steps == 0 or rule.eps == 0:
        return AttackOutcome(pixels.clone(), steps_taken)

    delta = _start(pixels, config, rule, randomness, start, carried)
    velocity = torch.zeros_like(pixels)
    if early_stop:
        return _early_stopped_ascent(embed_fn, pixels, target_embeds, delta, velocity, randomness, config, rule)
    for step in range(1, config.attack_steps + 1):
        smoothed = _smoothed(pixels, randomness, step, rule.sigma)
        delta.requires_grad_(True)
        with torch.enable_grad():
            objective = inner_objective(
                embed_fn, smoothed, delta, target_embeds, rule.norm, rule.eps, rule.eta, rule.elastic_rule
            )
            (grad,) = torch.autograd.grad(objective * OBJECTIVE_SCALE, delta)
        with torch.no_grad():
            delta, velocity = _ascend(delta, grad, velocity, pixels, rule)
    return AttackOutcome((pixels + delta).detach(), steps_taken + config.attack_steps)


@dataclass(frozen=True)
class _Rule:
    """The update rule of one attack, in pixel units (ε, α, η already divided by 255; σ in units of 1/255)."""

    norm: str
    elastic_rule: str
    kind: str  # how steps are normalised: see _direction_kind
    momentum: float
    group_size: int | None
    eps: float
    alpha: float
    eta: float
    sigma: float


def _rule(config: AttackSettings, pixels: torch.Tensor) -> _Rule:
    """`config`'s update rule, validated (norm, elastic rule, group size against the image)."""
    norm = config.attack_norm
    if norm not in ATTACK_NORMS:
        raise ValueError(f"attack_norm={norm!r} is not one of {ATTACK_NORMS}.")
    elastic_rule = getattr(config, "elastic_rule", "library")
    if elastic_rule not in ELASTIC_RULES:
        raise ValueError(f"elastic_rule={elastic_rule!r} is not one of {ELASTIC_RULES}.")
    group_size = getattr(config, "attack_group_size", None)
    if norm == "group":
        check_group_size(group_size, pixels.shape[-2], pixels.shape[-1])
    return _Rule(
        norm=norm,
        elastic_rule=elastic_rule,
        kind=_direction_kind(norm, elastic_rule),
        momentum=resolve_momentum(norm, elastic_rule, getattr(config, "attack_momentum", None)),
        group_size=group_size,
        eps=config.attack_eps / 255,
        alpha=config.attack_step_size / 255,
        eta=config.attack_eta / 255,
        sigma=config.noise_sigma,
    )


def _start(
    pixels: torch.Tensor,
    config: AttackSettings,
    rule: _Rule,
    randomness: ExampleRandomness | None,
    start: torch.Tensor | None = None,
    carried: torch.Tensor | None = None,
) -> torch.Tensor:
    """δ₀: the uniform random start in the ε-box (projected unless ``clamp_random_start`` is False), replaced by
    `start` (projected) on the rows where `carried` is True."""
    delta = _draw(pixels, randomness, 0, lambda t, g: t.uniform_(-rule.eps, rule.eps, generator=g))
    if getattr(config, "clamp_random_start", True):
        delta = _project(delta, pixels, rule.norm, rule.eps, rule.group_size)
    if start is not None and carried is not None and bool(carried.any()):
        resumed = _project(start.detach().to(delta), pixels, rule.norm, rule.eps, rule.group_size)
        delta = torch.where(carried.to(delta.device).view(-1, 1, 1, 1), resumed, delta)
    return delta


def _smoothed(pixels: torch.Tensor, randomness: ExampleRandomness | None, step: int, sigma: float) -> torch.Tensor:
    """The clean image with step `step`'s smoothing noise, clamp(x + z, 0, 1) with z ~ N(0, (σ/255)²)."""
    if sigma <= 0:
        return pixels
    # randn · σ / 255 in this order: at σ = 1 the very noise of the official code (randn / 255)
    noise = _draw(pixels, randomness, step, lambda t, g: t.normal_(generator=g))
    return (pixels + noise * sigma / 255).clamp(0, 1)


def _ascend(
    delta: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor, pixels: torch.Tensor, rule: _Rule
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: d = N(g); with momentum v ← N(μ·v + d), d = v; δ ← Π(δ + α·d). Returns (δ, v)."""
    direction = _direction(grad, rule.kind, rule.group_size)
    if rule.momentum:
        velocity = _direction(rule.momentum * velocity + direction, rule.kind, rule.group_size)
        direction = velocity
    return _project(delta + rule.alpha * direction, pixels, rule.norm, rule.eps, rule.group_size), velocity


def row_objectives(
    embed_fn: EmbedFn,
    pixels: torch.Tensor,
    delta: torch.Tensor,
    target_embeds: torch.Tensor,
    norm: str,
    eps: float,
    eta: float,
    elastic_rule: str = "library",
) -> torch.Tensor:
    """The inner objective of each row alone, ``||f(x_b + δ_b) − e0_b||² − P(δ_b)``: shape ``(B,)``.

    Their mean is :func:`inner_objective` (up to float rounding): every penalty is a mean over the batch of
    per-image terms.
    """
    penalties = torch.stack([norm_penalty(row[None], norm, eps, eta, elastic_rule) for row in delta])
    return embedding_distance(embed_fn(pixels + delta), target_embeds) - penalties


def _early_stopped_ascent(
    embed_fn: EmbedFn,
    pixels: torch.Tensor,
    target_embeds: torch.Tensor,
    delta: torch.Tensor,
    velocity: torch.Tensor,
    randomness: ExampleRandomness | None,
    config: AttackSettings,
    rule: _Rule,
) -> AttackOutcome:
    """The ascent of :func:`projected_gradient_ascent` where each row stops once its objective stops rising.

    Step k evaluates every active row at its current δ (with step k's noise). A row whose objective is not above
    its value at step k − 1 goes back to its previous δ and stops; the others take their step. Only active rows
    are forwarded, so a stopped row costs nothing more.
    """
    active = torch.ones(len(pixels), dtype=torch.bool, device=pixels.device)
    best = torch.full((len(pixels),), -torch.inf, device=pixels.device)
    previous = delta.clone()
    steps_taken = torch.zeros(len(pixels), dtype=torch.int64, device=pixels.device)
    for step in range(1, config.attack_steps + 1):
        rows = active.nonzero().flatten()
        if not len(rows):
            break
        # Drawn for every row, so that an example's noise stream does not depend on which rows stopped.
        smoothed = _smoothed(pixels, randomness, step, rule.sigma)
        current = delta[rows].requires_grad_(True)
        with torch.enable_grad():
            values = row_objectives(
                embed_fn, smoothed[rows], current, target_embeds[rows], rule.norm, rule.eps, rule.eta, rule.elastic_rule
            )
            (grad,) = torch.autograd.grad(values.sum() * OBJECTIVE_SCALE, current)
        with torch.no_grad():
            steps_taken[rows] += 1
            rising = values > best[rows]
            stopped, going = rows[~rising], rows[rising]
            delta[stopped] = previous[stopped]
            active[stopped] = False
            best[going] = values[rising]
            previous[going] = delta[going]
            delta[going], velocity[going] = _ascend(delta[going], grad[rising], velocity[going], pixels[going], rule)
    return AttackOutcome((pixels + delta).detach(), steps_taken.cpu())
