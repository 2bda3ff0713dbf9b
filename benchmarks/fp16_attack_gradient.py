"""Does fp16 autocast break the attack's input gradient? Sign agreement with fp32, with and without the objective scale.

    python benchmarks/fp16_attack_gradient.py                          # ViT-B/16, CPU autocast: 7.5 min on 2 cores
    python benchmarks/fp16_attack_gradient.py --device cuda --model vit-l-14-336

The attack only uses the sign of ∂L_in/∂δ (`hf_clip_aft.attack`), but the backward's intermediate gradients are
tiny (the objective is a batch mean of distances between unit vectors), and under fp16 autocast they are stored in
fp16, whose smallest normal number is 6.1e-5. This measures, on a randomly initialised tower, the largest
activation gradient of the fp32 backward and, for ``scale`` 1 and `hf_clip_aft.attack.OBJECTIVE_SCALE`, the
fraction of pixel gradients that are exactly 0 and the fraction whose sign agrees with fp32 (bf16 for comparison).
"""

from __future__ import annotations

import argparse

import torch
from transformers import CLIPVisionModelWithProjection

from hf_clip_aft.attack import OBJECTIVE_SCALE, inner_objective
from hf_clip_aft.model_configs import clip_config
from hf_clip_aft.modeling import encode_images

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's


def pixel_gradient(embed, pixels, delta, target, dtype: torch.dtype | None, scale: float) -> torch.Tensor:
    """∂(scale · L_in)/∂δ at `delta` (huber norm, the paper's budgets), under autocast to `dtype` if given."""
    delta = delta.clone().requires_grad_(True)
    with torch.autocast(pixels.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        objective = inner_objective(embed, pixels, delta, target, "huber", 4 / 255, 1 / 255)
    (grad,) = torch.autograd.grad(objective * scale, delta)
    return grad


def largest_activation_gradient(model, embed, pixels, delta, target) -> float:
    """The largest |gradient| reaching any module output in the fp32 backward of the unscaled objective."""
    largest = []
    hooks = [
        module.register_full_backward_hook(
            lambda _m, _gi, grad_out: largest.append(max(g.abs().max().item() for g in grad_out if g is not None))
        )
        for module in model.modules()
        if not list(module.children())
    ]
    pixel_gradient(embed, pixels, delta, target, None, 1.0)
    for hook in hooks:
        hook.remove()
    return max(largest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b-16", help="a named architecture of hf_clip_aft.model_configs")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[1, 8], help="the 1/B of the batch mean matters")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = clip_config(args.model).vision_config
    model = CLIPVisionModelWithProjection(config).to(args.device).requires_grad_(False)
    embed = lambda x: encode_images(model, x, MEAN, STD)  # noqa: E731
    size = config.image_size
    print(f"{args.model}, random weights, {args.device}; huber norm, ε = 4/255, δ uniform in the ε-ball")
    for batch in args.batch_size:
        pixels = torch.rand(batch, 3, size, size, device=args.device)
        with torch.no_grad():
            target = embed(pixels)
        delta = torch.empty_like(pixels).uniform_(-4 / 255, 4 / 255)
        reference = pixel_gradient(embed, pixels, delta, target, None, 1.0)
        print(
            f"batch {batch}: largest activation gradient of the fp32 backward "
            f"{largest_activation_gradient(model, embed, pixels, delta, target):.2e}"
        )
        for dtype, scale in [(torch.float16, 1.0), (torch.float16, OBJECTIVE_SCALE), (torch.bfloat16, 1.0)]:
            grad = pixel_gradient(embed, pixels, delta, target, dtype, scale)
            agree = (grad.sign() == reference.sign()).float().mean().item()
            print(
                f"  {str(dtype).removeprefix('torch.'):>8} scale {scale:>7.0f}: zero gradients "
                f"{(grad == 0).float().mean().item():.4%}, sign agrees with fp32 {agree:.4%}, "
                f"finite {bool(torch.isfinite(grad).all())}"
            )


if __name__ == "__main__":
    main()
