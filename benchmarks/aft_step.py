"""Throughput and memory of one AFT training step: the library's path against the reference algorithm's cost.

    python benchmarks/aft_step.py                  # ViT-B/32, batch 2, K=10, library vs naive: ~80 s on 2 CPU cores
    python benchmarks/aft_step.py --model vit-b-16 --batch_size 4 --threads 1 \
        --paths library library-precompute naive   # the RESULTS.md comparison: ~17 min
    python benchmarks/aft_step.py --model vit-b-32 --batch_size 4 --attack_steps 0 1 2 5 10 --paths library
    python benchmarks/aft_step.py --model vit-b-16 --device cuda --precision bf16 --batch_size 64 --peak_tflops 989
    python benchmarks/aft_step.py --model vit-b-16 --batch_size 2 --threads 1 --paths library \
        --schedules pgd pgd_early_stop fgsm_rs free carry      # every attack schedule: the RESULTS.md comparison

Nothing is downloaded: the vision tower is randomly initialised from a named architecture of
`hf_clip_aft.model_configs` (tiny, vit-b-16, vit-b-32, vit-l-14, vit-l-14-336) or read from a local checkpoint.
The timed step is the whole Trainer step (reference embeddings, attack, loss, backward, gradient clipping, optimizer
and scheduler step), measured by a callback after `--warmup` steps, median of `--steps`. Each (path, K, batch)
configuration runs in a fresh subprocess, so that its peak memory is its own.

Paths:
  library             `AFTTrainer` as shipped: `compute_loss` with the attack under `frozen_parameters`.
  library-precompute  the same with ``precompute_ref_embeddings=True`` (e0 carried in the batch; the one-off
                      precompute is timed separately).
  naive               the same Trainer with the reference implementation's step (RobustVLM's train loop): weights
                      requiring grad during the attack, a clean forward with graph even at clean weight 0 (alive
                      until the backward is done), always fp32.
  naive-no-clean      naive without the clean forward: what freezing the weights during the attack alone saves.

Schedules (``--schedules``, library paths; `hf_clip_aft.schedules`): ``pgd`` (K = ``--attack_steps``),
``pgd_early_stop`` (the same with ``attack_early_stop``), ``fgsm_rs``, ``free`` (``--replays``, each replay one
timed step) and ``carry`` (K = ``--carry_steps``, ATTA-1 by default; a benchmark run visits each image once, so it
measures the cost of a carried step, which is that of PGD with the same K). Besides FlopCounterMode's count, each
row gives the forward-equivalents the trainer itself counted (``counted``, the FLOP model of
`hf_clip_aft.schedules`, which leaves out attention's costlier backward).

Reported: step time and images/s; FLOPs of one step counted with `torch.utils.flop_counter.FlopCounterMode`
(matmuls, convolutions, attention; not element-wise ops), as forward-equivalents per image, achieved TFLOP/s and,
with ``--peak_tflops``, MFU; and the memory of one steady-state step, measured in a second process: ``peak`` is the
process's peak during the step (CPU: resident-set high-water mark, with glibc set to return freed tensors at once;
CUDA: `torch.cuda.max_memory_allocated`), ``step`` that peak minus what was resident when the step began (weights,
reference, optimizer state). On a CPU shared with other jobs pass ``--threads 1``: two OpenMP threads waiting on a
busy core made steps up to 10x slower in our runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection, TrainerCallback
from transformers.utils import logging as transformers_logging

from hf_clip_aft import AFTConfig, AFTTrainer, adversarial_perturbation
from hf_clip_aft.loss import fare_loss
from hf_clip_aft.model_configs import clip_config
from hf_clip_aft.trainer import load_vision_tower

PATHS = ("library", "library-precompute", "naive", "naive-no-clean")
SCHEDULES = ("pgd", "pgd_early_stop", "fgsm_rs", "free", "carry")
MIB = 2**20

# FlopCounterMode has no formula for the CPU flash-attention kernels that sdpa runs on the CPU; they do the same
# work as the CUDA ones.
_aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v)
    ),
}


class ReferenceCostTrainer(AFTTrainer):
    """`AFTTrainer` with the reference implementation's step structure: the cost baseline of this benchmark.

    The same math and the same random draws as the library (its own pure functions), so the loss is the same for
    the same seed. What differs is the waste: the attack runs with the weights still requiring grad (autograd keeps
    the activations their gradients would need), and a clean forward with graph runs even when its loss weight is 0,
    its graph alive until the backward is done (the reference frees it in its logging, after the optimizer step).
    ``clean_forward=False`` leaves the second waste out.
    """

    clean_forward = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixels = inputs["pixel_values"]
        target = self.reference_embeds(model, pixels)
        attack_model = self._forward_model(model)
        adv_pixels = adversarial_perturbation(
            lambda x: self._embed(attack_model, x), pixels, target, self.args, self.attack_randomness(model, inputs)
        )
        self._clean_embeds = self._embed(model, pixels) if self.clean_forward else None
        w = self.args.clean_weight
        clean_loss = fare_loss(self._clean_embeds, target) if w > 0 else 0.0
        return w * clean_loss + (1 - w) * fare_loss(self._embed(model, adv_pixels), target)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self._clean_embeds = None
        return loss


@dataclass
class Setting:
    """One benchmarked configuration (what a worker subprocess receives)."""

    path: str
    model: str = "vit-b-32"
    batch_size: int = 2
    attack_steps: int = 10
    precision: str = "fp32"
    device: str = "cpu"
    warmup: int = 1
    steps: int = 3
    seed: int = 0
    activation_checkpointing: bool = False
    torch_compile: bool = False
    optim: str | None = None  # None: AFTConfig's default (fused AdamW with torch ≥ 2.8)
    attn_implementation: str = "sdpa"
    threads: int | None = None
    logging_steps: int | None = None  # None: no step of the run is logged
    schedule: str = "pgd"  # one of SCHEDULES (library paths)
    replays: int = 4  # free's m


def schedule_settings(setting: Setting) -> dict:
    """The `AFTConfig` fields of `setting`'s attack schedule (the naive path is always plain PGD)."""
    if setting.path.startswith("naive") or setting.schedule == "pgd":
        return {}
    if setting.schedule == "pgd_early_stop":
        return {"attack_early_stop": True}
    if setting.schedule == "free":
        return {"attack_schedule": "free", "attack_replays": setting.replays}
    return {"attack_schedule": setting.schedule}


def build_vision_tower(name_or_path: str, attn_implementation: str, seed: int) -> CLIPVisionModelWithProjection:
    """A named architecture with random weights (seeded), or a local checkpoint's vision tower."""
    if os.path.exists(name_or_path):
        return load_vision_tower(name_or_path, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    config = clip_config(name_or_path).vision_config
    config._attn_implementation = attn_implementation
    return CLIPVisionModelWithProjection(config)


def vit_forward_flops(config) -> int:
    """Matmul FLOPs of one image through a CLIP ViT (2 per multiply-add; what FlopCounterMode counts).

    Patch embedding ``2·3P²·D·N``; per layer the q, k, v, o projections ``8·T·D²``, the MLP ``4·T·D·I`` and attention
    ``4·T²·D`` (T = N + 1 tokens); the projection of the pooled token ``2·D·E``.
    """
    d, size, patch = config.hidden_size, config.image_size, config.patch_size
    patches = (size // patch) ** 2
    tokens = patches + 1
    layer = 8 * tokens * d**2 + 4 * tokens * d * config.intermediate_size + 4 * tokens**2 * d
    return 2 * 3 * patch**2 * d * patches + config.num_hidden_layers * layer + 2 * d * config.projection_dim


def random_image_dataset(count: int, size: int, seed: int) -> datasets.Dataset:
    """`count` random RGB images already at the model's resolution (the processor's resize and crop are no-ops)."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    return datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())


def _memory_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (Linux)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _unit = line.split()
                values[key.rstrip(":")] = int(amount) * 1024
    return values


class StepProbe(TrainerCallback):
    """Times the steps after the warm-up, or (``measure="memory"``) counts the FLOPs of the first step and the peak
    memory of the first step after the warm-up."""

    def __init__(self, measure: str, warmup: int, device: torch.device):
        self.measure = measure
        self.warmup = warmup
        self.device = device
        self.times: list[float] = []
        self.step_flops = 0
        self.memory: dict[str, int] = {}
        self.trainer: AFTTrainer | None = None  # set after the trainer is built, to read its own count
        self.counted: list[float] = []  # the trainer's forward-equivalents per image of each step
        self._counting: contextlib.ExitStack | None = None
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        if self.measure == "memory" and state.global_step == 0:
            # Counted in eager mode: compiled kernels hide their ops from the counter (and a dispatch mode active at
            # the first call would keep dynamo from compiling), so torch.compile starts with the next step.
            self._counting = contextlib.ExitStack()
            self._counting.enter_context(torch.compiler.set_stance("force_eager"))
            self._counter = self._counting.enter_context(
                FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
            )
        if self.measure == "memory" and state.global_step == self.warmup:
            self._reset_memory_peak()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        elapsed = time.perf_counter() - self._start
        counts = self.trainer._metrics["train"].get("forward_equivalents") if self.trainer else None
        if counts:
            self.counted.append(counts[-1].item())
        if self._counting is not None:
            self._counting.close()
            self._counting = None
            self.step_flops = self._counter.get_total_flops()
        if self.measure == "memory" and state.global_step == self.warmup + 1:
            self._read_memory_peak()
        if self.measure == "time" and state.global_step > self.warmup:
            self.times.append(elapsed)

    def _reset_memory_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.memory["start"] = torch.cuda.memory_allocated(self.device)
            return
        self.memory["start"] = _memory_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident set (Linux ≥ 4.0)

    def _read_memory_peak(self) -> None:
        if self.device.type == "cuda":
            self.memory["peak"] = torch.cuda.max_memory_allocated(self.device)
        else:
            self.memory["peak"] = _memory_status()["VmHWM"]


def run_setting(setting: Setting, measure: str) -> dict:
    """Train warmup + steps optimizer steps of one setting and return the timings (``measure="time"``), or warmup + 1
    steps and return the FLOPs and the peak memory (``measure="memory"``)."""
    if setting.threads:
        torch.set_num_threads(setting.threads)
    device = torch.device(setting.device)
    vision = build_vision_tower(setting.model, setting.attn_implementation, setting.seed)
    size = vision.config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter, torch.no_grad():
        vision(pixel_values=torch.zeros(1, 3, size, size))
    forward_flops = counter.get_total_flops()

    naive = setting.path.startswith("naive")
    total_steps = setting.warmup + (setting.steps if measure == "time" else 1)
    with tempfile.TemporaryDirectory() as output_dir:
        args = AFTConfig(
            output_dir=output_dir,
            use_cpu=device.type == "cpu",
            max_steps=total_steps,
            per_device_train_batch_size=setting.batch_size,
            attack_steps=setting.attack_steps,
            bf16=setting.precision == "bf16" and not naive,
            fp16=setting.precision == "fp16" and not naive,
            activation_checkpointing=setting.activation_checkpointing and not naive,
            torch_compile=setting.torch_compile and not naive,
            precompute_ref_embeddings=setting.path == "library-precompute",
            # Logged steps add a no-grad clean forward (for cos_sim_clean) and the metrics' host syncs.
            logging_steps=setting.logging_steps or total_steps + 1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=setting.seed,
            **schedule_settings(setting),
            # The reference steps torch.optim.AdamW with its defaults.
            **({"optim": "adamw_torch"} if naive else {"optim": setting.optim} if setting.optim else {}),
        )
        probe = StepProbe(measure, setting.warmup, device)
        trainer_class = ReferenceCostTrainer if naive else AFTTrainer
        if setting.path == "naive-no-clean":
            trainer_class = type("NoCleanForwardTrainer", (ReferenceCostTrainer,), {"clean_forward": False})
        dataset = random_image_dataset(setting.batch_size * total_steps, size, setting.seed)
        trainer = trainer_class(vision, args=args, train_dataset=dataset, processing_class=processor, callbacks=[probe])
        probe.trainer = trainer
        precompute_s = None
        if args.precompute_ref_embeddings:
            start = time.perf_counter()
            trainer.get_train_dataloader()  # embeds the train set once; train() then reuses the table
            precompute_s = time.perf_counter() - start
        loss = trainer.train().training_loss
        counted = probe.counted

    if measure == "time":
        step_s = statistics.median(probe.times)
        return {
            "step_s": step_s,
            "step_times_s": probe.times,
            "images_per_s": setting.batch_size / step_s,
            "train_loss": loss,
            "precompute_s": precompute_s,
            "precompute_images": len(dataset),
            "threads": torch.get_num_threads(),
        }
    return {
        "forward_gflop_per_image": forward_flops / 1e9,
        "analytic_forward_gflop_per_image": vit_forward_flops(vision.config) / 1e9,
        "step_gflop": probe.step_flops / 1e9,
        "forward_equivalents_per_image": probe.step_flops / (setting.batch_size * forward_flops),
        "peak_mib": probe.memory["peak"] / MIB,
        "step_peak_mib": (probe.memory["peak"] - probe.memory["start"]) / MIB,
        "counted_forward_equivalents_per_image": statistics.mean(counted) if counted else None,
    }


def run_in_subprocess(setting: Setting) -> dict:
    """Both measurements of one setting, each in a fresh process so that no peak or cache carries over.

    On the CPU the memory run sets glibc's mmap threshold to 64 KiB, so that every freed tensor leaves the resident
    set at once (by default glibc keeps freed blocks, and the resident set only ever grows); this slows the steps,
    which is why the timing runs in a process of its own with the default allocator.
    """
    result = {"setting": asdict(setting)}
    for measure in ("memory", "time"):
        env = dict(os.environ)
        if measure == "memory" and setting.device == "cpu":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        command = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(asdict(setting)), measure]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"The {measure} worker for {setting} failed (exit code {done.returncode}); see above.")
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    result["tflops"] = result["step_gflop"] / result["step_s"] / 1e3
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def print_table(results: list[dict], peak_tflops: float | None) -> None:
    print(
        f"{'path':<19}{'schedule':<15}{'K':>3}{'batch':>6}{'prec':>6}{'step s':>9}{'img/s':>8}{'fwd-eq/img':>11}"
        f"{'TFLOP/s':>9}{'MFU':>7}{'peak MiB':>10}{'step MiB':>10}{'counted':>9}"
    )
    for r in results:
        s = r["setting"]
        precision = "fp32" if s["path"].startswith("naive") else s["precision"]
        mfu = f"{r['tflops'] / peak_tflops:.1%}" if peak_tflops else "-"
        print(
            f"{s['path']:<19}{s['schedule']:<15}{_steps(s):>3}{s['batch_size']:>6}{precision:>6}{r['step_s']:>9.3f}"
            f"{r['images_per_s']:>8.2f}{r['forward_equivalents_per_image']:>11.2f}{r['tflops']:>9.3f}{mfu:>7}"
            f"{r['peak_mib']:>10.0f}{r['step_peak_mib']:>10.0f}{_counted(r):>9}"
        )


def _steps(setting: dict) -> str:
    return "-" if setting["schedule"] in ("fgsm_rs", "free") else str(setting["attack_steps"])


def _counted(result: dict) -> str:
    value = result.get("counted_forward_equivalents_per_image")
    return "-" if value is None else f"{value:.2f}"


def print_schedule_ratios(results: list[dict]) -> None:
    """Every schedule against plain PGD with the most steps, per batch size and path: FLOPs and images/s ratios."""
    for r in results:
        s = r["setting"]
        pgd = [
            other
            for other in results
            if other["setting"]["schedule"] == "pgd"
            and other["setting"]["path"] == s["path"]
            and other["setting"]["batch_size"] == s["batch_size"]
        ]
        if not pgd or s["schedule"] == "pgd":
            continue
        reference = max(pgd, key=lambda other: other["setting"]["attack_steps"])
        k = reference["setting"]["attack_steps"]
        print(
            f"{s['schedule']} (K={_steps(s)}) / pgd K={k}, batch {s['batch_size']}: FLOPs per image "
            f"{r['forward_equivalents_per_image'] / reference['forward_equivalents_per_image']:.3f}, "
            f"images/s {r['images_per_s'] / reference['images_per_s']:.2f}x"
        )


def print_ratios(results: list[dict]) -> None:
    """library / naive for every (K, batch) that has both."""
    by_key: dict[tuple[int, int], dict[str, dict]] = {}
    for r in results:
        s = r["setting"]
        if s["schedule"] == "pgd":
            by_key.setdefault((s["attack_steps"], s["batch_size"]), {})[s["path"]] = r
    for (k, batch), paths in by_key.items():
        naive = paths.get("naive")
        for name in ("library", "library-precompute", "naive-no-clean"):
            if naive is None or name not in paths:
                continue
            lib = paths[name]
            print(
                f"{name}/naive at K={k}, batch {batch}: step time {lib['step_s'] / naive['step_s']:.3f} "
                f"(speed-up {naive['step_s'] / lib['step_s']:.2f}x), peak memory "
                f"{lib['peak_mib'] / naive['peak_mib']:.3f}, "
                f"step memory {lib['step_peak_mib'] / naive['step_peak_mib']:.3f}; "
                f"mean loss {lib['train_loss']:.6g} vs {naive['train_loss']:.6g}"
            )
            if lib["precompute_s"] is not None:
                print(
                    f"  (plus a one-off precompute of e0: {lib['precompute_s']:.2f} s "
                    f"for {lib['precompute_images']} images)"
                )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="vit-b-32",
        help="a named architecture (tiny, vit-b-16, vit-b-32, vit-l-14, vit-l-14-336) or a local CLIP checkpoint",
    )
    parser.add_argument("--paths", nargs="+", default=["library", "naive"], choices=PATHS)
    parser.add_argument("--batch_size", nargs="+", type=int, default=[2], help="per-device batch size(s)")
    parser.add_argument("--attack_steps", nargs="+", type=int, default=[10], help="attack step count(s) K")
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=["pgd"],
        choices=SCHEDULES,
        help="attack schedules of the library paths (fgsm_rs and free run once, whatever K)",
    )
    parser.add_argument("--replays", type=int, default=4, help="free's replays m")
    parser.add_argument("--carry_steps", type=int, default=1, help="carry's K (ATTA-1: 1)")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="autocast of the library paths (the naive path is always fp32)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--activation_checkpointing", action="store_true", help="library paths only")
    parser.add_argument("--torch_compile", action="store_true", help="library paths only")
    parser.add_argument(
        "--optim",
        default=None,
        help="library paths; AFTConfig's default (adamw_torch_fused with torch ≥ 2.8) when omitted",
    )
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument(
        "--logging_steps",
        type=int,
        default=None,
        help="log every this many steps (default: no step of the run is logged)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch's default when omitted)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--_worker", nargs=2, default=None, help=argparse.SUPPRESS)  # SETTING_JSON time|memory
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error(
            "--warmup must be ≥ 1: the first step is FLOP-counted (and slower for it), "
            "and allocates the optimizer state."
        )
    if args.steps < 1:
        parser.error("--steps must be ≥ 1.")
    if args.torch_compile and args.warmup < 2:
        parser.error(
            "--torch_compile needs --warmup ≥ 2: the first step runs eager for the FLOP count, the second compiles."
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker is not None:
        setting, measure = args._worker
        transformers_logging.set_verbosity_error()
        datasets.disable_progress_bars()
        print(json.dumps(run_setting(Setting(**json.loads(setting)), measure)))
        return
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} threads"
    load_before = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {args.model} on {device} ({where}), torch {torch.__version__}, "
        f"load average {load_before[0]:.2f}"
    )
    results = []
    runs = []  # (schedule, K): fgsm_rs and free take no K, carry has its own
    for schedule in args.schedules:
        # fgsm_rs and free ignore attack_steps (it only has to be > 0): shown as "-".
        steps = {"fgsm_rs": [1], "free": [1], "carry": [args.carry_steps]}.get(schedule, args.attack_steps)
        runs += [(schedule, k) for k in steps]
    for schedule, k in runs:
        for batch in args.batch_size:
            for path in args.paths:
                if schedule != "pgd" and path.startswith("naive"):
                    continue  # the naive baseline is plain PGD
                setting = Setting(
                    path=path,
                    schedule=schedule,
                    replays=args.replays,
                    model=args.model,
                    batch_size=batch,
                    attack_steps=k,
                    precision=args.precision,
                    device=device,
                    warmup=args.warmup,
                    steps=args.steps,
                    seed=args.seed,
                    activation_checkpointing=args.activation_checkpointing,
                    torch_compile=args.torch_compile,
                    optim=args.optim,
                    attn_implementation=args.attn_implementation,
                    threads=args.threads,
                    logging_steps=args.logging_steps,
                )
                results.append(run_in_subprocess(setting))
                print(f"  done: {path} {schedule} K={k} batch {batch}: {results[-1]['step_s']:.3f} s/step", flush=True)
    first = results[0]
    print(
        f"forward: {first['forward_gflop_per_image']:.3f} GFLOP/image counted "
        f"({first['analytic_forward_gflop_per_image']:.3f} analytic)"
    )
    print_table(results, args.peak_tflops)
    print_ratios(results)
    print_schedule_ratios(results)
    print(f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    if args.output:
        with open(args.output, "w") as out:
            json.dump({"load_average": [load_before[0], os.getloadavg()[0]], "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
