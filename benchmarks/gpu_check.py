"""Prepared GPU check: bf16 training of a 1B-class LLaVA-style model and its upcycled MoE on one CUDA GPU.

Run on a machine with a CUDA GPU (no downloads: random weights from configs; under 8 minutes on an H100/H200):

    python benchmarks/gpu_check.py --json --out benchmarks/results/gpu_check.json

What it measures, in this order (the phases cannot interleave: the MoE is converted from the dense model in
place, and a module wrapped in DDP stays wrapped):

1. ``dense``: the model composed as training composes it (``MultimodalLM``: frozen CLIP ViT-L/14-336 tower in
   bf16, ``mlp2x_gelu`` connector, a TinyLlama-1.1B-shaped Llama (hidden 2048, 22 layers, 32 heads / 4 KV
   heads, FFN 5632, vocab 32000) trainable in float32 master weights), ``torch.autocast`` bf16 (the project's
   ``bf16-mixed``), fused AdamW, gradient clipping; ``--batch`` x ``--seq`` tokens per step (576 image tokens
   + text, loss on the last ``--answer`` tokens of each sample);
2. ``dense_ddp``: the same model wrapped in ``DistributedDataParallel`` on one GPU (``torch.distributed`` with
   one process, nccl), same steps: the cost of DDP's hooks and (one-rank) all-reduces;
3. ``moe``: ``convert_to_moe`` (``lightningmodules/models/moe``) upcycles every other decoder FFN into 4
   experts, top-2 (MoE-LLaVA's layout), then steps alternate between the experts on
   ``torch.nn.functional.grouped_mm`` (``GroupedExperts(grouped_mm="always")``) and the per-expert loop
   (``"never"``), same weights, rounds interleaved.

Per phase: seconds per step (median and spread over ``--rounds`` rounds of ``--steps`` steps, after
``--warmup`` steps; CUDA synchronised at the round's ends only), tokens/s, peak memory
(``torch.cuda.max_memory_allocated``), model FLOPs per step counted over one step (every matmul and attention
kernel ``torch.utils.flop_counter`` has a formula for; the MoE's with the per-expert loop, whose FLOPs equal
grouped_mm's) and the model FLOP utilisation ``FLOPs per step / step time / peak``. Peak bf16 dense tensor
FLOPs assumed (no sparsity): H100 SXM and H200 989.4 TFLOP/s, H100 NVL 835, H100 PCIe 756, A100 312, L40S 362
(``--peak-tflops`` overrides; another GPU: MFU is left out).

``--cpu-reduced`` (also ``--reduced``): the same phases on CPU with a tiny model (gloo for DDP, bf16 autocast
on CPU), seconds long, so the script is run by the tests and does not rot; its figures are not measurements,
and its output says so. Without CUDA and without ``--cpu-reduced`` it prints that it has nothing to measure
and exits 0 (``make bench`` runs every benchmark).
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402 (after sys.path)

PEAK_TFLOPS_BF16 = (  # (name substring, dense bf16 tensor TFLOP/s), first match wins
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
)

FULL = {
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14),
    "llm": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "batch": 8, "seq": 1024, "answer": 256, "steps": 10, "rounds": 3, "warmup": 3,
}  # fmt: skip
REDUCED = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=56, patch_size=14),
    "llm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    "batch": 2, "seq": 48, "answer": 8, "steps": 2, "rounds": 2, "warmup": 1,
}  # fmt: skip


def peak_tflops(device_name: str | None, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, f"--peak-tflops {override}"
    for key, value in PEAK_TFLOPS_BF16:
        if device_name and key in device_name:
            return value, f"{key}: {value} TFLOP/s bf16 dense (datasheet, no sparsity)"
    return None, f"unknown GPU {device_name!r}: no peak assumed, MFU left out"


def build_model(sizes: dict, device: torch.device):
    """``MultimodalLM`` of a CLIP tower (frozen, bf16), an mlp2x_gelu connector and a Llama (float32, trainable)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig

    from lightningmodules.models.connector import MLPConnector
    from lightningmodules.models.language import causal_lm_from_config
    from lightningmodules.models.multimodal import MultimodalLM
    from lightningmodules.models.vision import VisionTower

    with torch.device(device):
        torch.manual_seed(0)
        encoder = CLIPVisionModel(CLIPVisionConfig(**sizes["vision"])).to(torch.bfloat16)
        vision = VisionTower(encoder=encoder, select_layer=-2, select_feature="patch", frozen=True)
        vocab = sizes["llm"]["vocab_size"]
        llm = causal_lm_from_config(
            LlamaConfig(**sizes["llm"], tie_word_embeddings=False), vocab_size=vocab + 1, attn_implementation="sdpa"
        )
        connector = MLPConnector(in_dim=vision.hidden_size, out_dim=llm.config.hidden_size)
        model = MultimodalLM(
            vision=vision, connector=connector, llm=llm, image_token_id=vocab, num_image_tokens=vision.num_tokens
        )
    return model.to(device)


def make_batch(model, sizes: dict, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, t, image = sizes["batch"], sizes["seq"], model.num_image_tokens
    vocab = model.image_token_id
    if t <= image + 1 + sizes["answer"]:
        raise ValueError(
            f"--seq {t} leaves no room for {image} image tokens, a BOS and {sizes['answer']} answer tokens"
        )
    input_ids = torch.randint(2, vocab, (b, t), generator=g)  # (B, T)
    input_ids[:, 0] = 1
    input_ids[:, 1 : 1 + image] = model.image_token_id
    labels = torch.full_like(input_ids, -100)
    labels[:, -sizes["answer"] :] = input_ids[:, -sizes["answer"] :]
    size = model.vision.image_size
    pixel_values = torch.randn(b, 3, size, size, generator=g)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    batch["pixel_values"] = pixel_values
    return {k: v.to(device) for k, v in batch.items()}


class Trainer:
    """Steps of one model (or its DDP wrapper): autocast bf16, backward, clipping, AdamW."""

    def __init__(self, model, batch: dict, device: torch.device, forward=None) -> None:
        self.model, self.batch, self.device = model, batch, device
        self.forward = forward or model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, fused=device.type == "cuda")

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.forward(**self.batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps, synchronised at both ends."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - start) / steps

    def flops(self) -> int:
        """FLOPs of one training step (forward + backward; the optimiser has no matmul)."""
        with common.MatmulFlops() as counter:
            self.step()
        return counter.total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def phase(seconds: list[float], tokens: int, flops: int, peak: float | None, memory: float | None) -> dict[str, Any]:
    """A phase's figures from its per-round seconds per step."""
    out = {
        "step_seconds": common.spread(seconds, 5),
        "tokens_per_s": common.spread([tokens / s for s in seconds], 1),
        "flops_per_step": flops,
        "achieved_tflops": common.spread([flops / s / 1e12 for s in seconds], 2),
        "mfu": common.spread([flops / s / (peak * 1e12) for s in seconds], 4) if peak else None,
        "peak_memory_gb": memory,
    }
    return out


def params(model) -> dict[str, int]:
    def count(module, trainable=None) -> int:
        return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)

    return {"vision": count(model.vision), "connector": count(model.connector), "llm": count(model.llm)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--cpu-reduced", action="store_true", help="tiny model on CPU, seconds (tests)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (image tokens included)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before each phase")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    args = parser.parse_args()
    args.cpu_reduced = args.cpu_reduced or args.reduced
    args.reduced = args.cpu_reduced
    if not args.cpu_reduced and not torch.cuda.is_available():
        print("gpu_check: no CUDA device, nothing to measure (--cpu-reduced runs the reduced CPU version)")
        return
    sizes = dict(REDUCED if args.cpu_reduced else FULL)
    for key in ("batch", "seq", "steps", "warmup", "rounds"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    args.rounds = sizes["rounds"]
    device = torch.device("cpu" if args.cpu_reduced else "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    common.quiet()
    wall = time.perf_counter()
    result = common.header("gpu_check", args, common.load_average())
    name = None if device.type == "cpu" else torch.cuda.get_device_name(device)
    peak, assumption = peak_tflops(name, args.peak_tflops)
    if args.cpu_reduced:
        peak, assumption = None, "CPU reduced run: no peak, no MFU"
    note = "CPU REDUCED RUN: tiny model, figures are not measurements" if args.cpu_reduced else "CUDA run"
    print(f"gpu_check: {note}; device {name or 'cpu'}", file=sys.stderr)
    tokens = sizes["batch"] * sizes["seq"]

    def log(message: str) -> None:
        print(f"gpu_check [{time.perf_counter() - wall:6.1f} s] {message}", file=sys.stderr, flush=True)

    # 1. dense
    model = build_model(sizes, device)
    batch = make_batch(model, sizes, device)
    counts = params(model)
    log(f"dense model built: {counts}")
    trainer = Trainer(model, batch, device)
    reset_peak(device)
    for _ in range(sizes["warmup"]):
        trainer.step()
    dense_flops = trainer.flops()
    dense_seconds = [trainer.timed(sizes["steps"]) for _ in range(sizes["rounds"])]
    dense = phase(dense_seconds, tokens, dense_flops, peak, peak_gb(device))
    log(f"dense: {dense['step_seconds']['median']:.4f} s/step")

    # 2. the same model under DDP with one process
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
        ddp_trainer = Trainer(model, batch, device, forward=wrapped)
        ddp_trainer.optimizer = trainer.optimizer  # the same optimiser state: only the wrapper differs
        reset_peak(device)
        for _ in range(sizes["warmup"]):
            ddp_trainer.step()
        ddp_seconds = [ddp_trainer.timed(sizes["steps"]) for _ in range(sizes["rounds"])]
        dense_ddp = phase(ddp_seconds, tokens, dense_flops, peak, peak_gb(device))
        # the phases run one after the other (not interleaved): a ratio of medians
        dense_ddp["ddp_over_plain_median"] = round(
            dense_ddp["step_seconds"]["median"] / dense["step_seconds"]["median"], 4
        )
        dense_ddp["backend"] = backend
        del wrapped, ddp_trainer
    finally:
        dist.destroy_process_group()
    log(f"dense DDP: {dense_ddp['step_seconds']['median']:.4f} s/step")
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. upcycled MoE: grouped_mm against the per-expert loop, same weights, interleaved rounds
    from lightningmodules.models.moe import GroupedExperts, convert_to_moe, grouped_mm_available

    with torch.device(device):
        converted = convert_to_moe(
            model.llm, layers="every_other", num_experts=args.experts, top_k=args.top_k, meta_expert=False,
            renormalize=True,
        )  # fmt: skip
    model.to(device)
    moe_counts = params(model)
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    active = moe_counts["llm"] - sum(
        (1 - args.top_k / m.num_experts) * sum(p.numel() for p in (m.w_in, m.w_out)) for m in experts
    )
    log(f"MoE: layers {converted} upcycled, {moe_counts}")

    def use(setting: str) -> None:
        for m in experts:
            m.grouped_mm = setting

    moe_trainer = Trainer(model, batch, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        use("never")
        loss_loop = float(model(**batch).loss)
        use("always")
        loss_grouped = float(model(**batch).loss) if grouped_mm_available() else float("nan")
    reset_peak(device)
    use("never")
    for _ in range(sizes["warmup"]):
        moe_trainer.step()
    moe_flops = moe_trainer.flops()  # the loop's addmm / mm are counted; grouped_mm has no formula
    memory_loop = peak_gb(device)
    variants = {"loop": "never", "grouped_mm": "always"} if grouped_mm_available() else {"loop": "never"}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    reset_peak(device)
    use("always" if "grouped_mm" in variants else "never")
    for _ in range(sizes["warmup"]):
        moe_trainer.step()
    memory_grouped = peak_gb(device)
    for r in range(sizes["rounds"]):
        for variant in common.round_order(list(variants), r):
            use(variants[variant])
            seconds[variant].append(moe_trainer.timed(sizes["steps"]))
    moe = {
        variant: phase(values, tokens, moe_flops, peak, memory_grouped if variant == "grouped_mm" else memory_loop)
        for variant, values in seconds.items()
    }
    if "grouped_mm" in seconds:
        moe["grouped_mm_over_loop"] = common.spread(common.ratios(seconds["grouped_mm"], seconds["loop"]))
    moe["max_abs_loss_diff_grouped_vs_loop"] = abs(loss_grouped - loss_loop)
    moe["layers"] = converted
    moe["experts"], moe["top_k"] = args.experts, args.top_k
    log("MoE: " + ", ".join(f"{v} {moe[v]['step_seconds']['median']:.4f} s/step" for v in seconds))

    result.update(
        {
            "cpu_reduced": args.cpu_reduced,
            "note": note,
            "device": name or "cpu",
            "peak_tflops_bf16": peak,
            "peak_assumption": assumption,
            "precision": "bf16 autocast over float32 trainable weights (bf16-mixed); vision tower bf16, frozen",
            "params": {"dense": counts, "moe": moe_counts, "moe_llm_active_per_token": int(active)},
            "batch": sizes["batch"],
            "seq": sizes["seq"],
            "image_tokens": model.num_image_tokens,
            "answer_tokens": sizes["answer"],
            "tokens_per_step": tokens,
            "steps_per_round": sizes["steps"],
            "warmup_steps": sizes["warmup"],
            "dense": dense,
            "dense_ddp": dense_ddp,
            "moe": moe,
            "flop_method": "torch.utils.flop_counter formulas over one training step (matmuls, attention)",
            "wall_seconds": round(time.perf_counter() - wall, 1),
            "torch_cuda": torch.version.cuda,
        }
    )

    def lines(res: dict) -> list[str]:
        out = [f"gpu_check ({res['note']}), {res['device']}, {tokens} tokens/step, {res['peak_assumption']}"]
        for label, figures in (("dense", res["dense"]), ("dense DDP", res["dense_ddp"]), *(
            (f"MoE {v}", res["moe"][v]) for v in variants)):  # fmt: skip
            mfu = figures["mfu"]
            out.append(
                f"  {label:<14} {common.fmt(figures['step_seconds'], ' s/step', 4)}, "
                f"{figures['tokens_per_s']['median']:.0f} tokens/s, {figures['achieved_tflops']['median']:.2f} TFLOP/s"
                + (f", MFU {mfu['median']:.3f}" if mfu else "")
                + (f", peak {figures['peak_memory_gb']} GB" if figures["peak_memory_gb"] is not None else "")
            )
        if "grouped_mm_over_loop" in res["moe"]:
            out.append(f"  grouped_mm / loop step time {common.fmt(res['moe']['grouped_mm_over_loop'])}")
        out.append(f"  wall {res['wall_seconds']} s")
        return out

    common.emit(result, args, lines)


if __name__ == "__main__":
    main()
