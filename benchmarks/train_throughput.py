"""Training tokens/s: our GPT in a plain loop, through Lightning's Trainer, compiled, and
transformers' GPT2LMHeadModel, on the same shapes with the same weights in one process.

The variants take turns (round-robin), each round running warm-up steps and then timed steps of
every variant, so a change in machine load touches all of them alike; the median round is
reported.

    python benchmarks/train_throughput.py                       # 124M, batch 4 x 256, fp32, CPU
    python benchmarks/train_throughput.py --compile --repeats 5
    python benchmarks/train_throughput.py --quick               # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import transformers
from common import (
    markdown_table,
    non_negative_int,
    peak_matmul_flops,
    positive_int,
    resolve_device,
    save_ratio_chart,
    synchronize,
)
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.utilities import disable_possible_user_warnings
from torch.utils.data import DataLoader, TensorDataset

from gpt2_lightning.callbacks import keep_freed_memory
from gpt2_lightning.model import ALIASES, GPT, SIZES, GPTConfig
from gpt2_lightning.module import GPTLightningModule
from gpt2_lightning.weights import config_to_hf, state_to_hf

PLAIN = "ours: plain loop"
LIGHTNING = "ours: Lightning Trainer"
COMPILED = "ours: torch.compile"
TRANSFORMERS = "transformers GPT2LMHeadModel"

# The optimizer of conf/optimizer/adamw.yaml; no warmup, so every timed step has the full lr.
OPTIMIZER = {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}
SCHEDULER = {"name": "constant", "warmup_steps": 0}

# Defaults of a full run and of --quick; an option given on the command line wins over both.
FULL = {"size": "124M", "batch": 4, "seq": 256, "repeats": 3, "steps": 3, "warmup": 1}
QUICK = {"size": "tiny", "batch": 2, "seq": 32, "repeats": 2, "steps": 2, "warmup": 1}
PEAK_MATMUL_SIZE = {False: 2048, True: 512}  # by --quick
PEAK_MATMUL_SIZE_CUDA = 8192

Logits = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, vocab)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=[*SIZES, *ALIASES], help="model size (default 124M)")
    parser.add_argument("--batch", type=positive_int, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=positive_int, help="tokens per sequence (default 256)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    parser.add_argument(
        "--precision",
        choices=["32", "bf16"],
        default="32",
        help="32: fp32 (default); bf16: bf16 mixed precision (autocast, fp32 weights)",
    )
    parser.add_argument("--repeats", type=positive_int, help="rounds over the variants (def. 3)")
    parser.add_argument("--chart", type=Path, help="also save the ratios as a bar chart (PNG)")
    parser.add_argument("--steps", type=positive_int, help="timed steps per round (default 3)")
    parser.add_argument(
        "--warmup", type=non_negative_int, help="untimed steps before each round's (default 1)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="add torch.compile (minutes to compile on CPU)"
    )
    quick = ", ".join(f"--{key} {value}" for key, value in QUICK.items())
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke test of seconds: defaults {quick}"
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = resolve_device(parser, args.device)
    args.cfg = GPTConfig.from_name(args.size)
    if args.seq > args.cfg.context_length:
        parser.error(
            f"--seq {args.seq} exceeds the context length of size {args.size} "
            f"({args.cfg.context_length})"
        )
    return args


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 mixed precision as Lightning's 'bf16-mixed' does it: matmuls in bf16, weights fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def adamw(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW as GPTLightningModule configures it, for the plain loops: weight decay on matrices
    only, and fused, but under bf16 mixed precision (where the module keeps the default foreach
    implementation, so that Lightning can clip its gradients)."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": OPTIMIZER["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=OPTIMIZER["lr"],
        betas=tuple(OPTIMIZER["betas"]),
        eps=OPTIMIZER["eps"],
        fused=args.device.type in ("cuda", "cpu") and args.precision != "bf16",
    )


def plain_loop(
    model: torch.nn.Module,
    logits_of: Logits,
    batch: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> list[float]:
    """Seconds of each timed step of a hand-written training loop (warm-up steps left out)."""
    x, y = batch
    model.train()
    # A fresh optimizer each round, as Lightning's fit builds one: no variant keeps its AdamW
    # moments (two copies of the weights) in memory while the others run.
    optimizer = adamw(model, args)
    durations = []
    for _ in range(args.warmup + args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(args.device, args.precision):
            loss = F.cross_entropy(logits_of(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        synchronize(args.device)
        durations.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)  # the gradients, too, are freed before the next variant
    return durations[args.warmup :]


class StepTimer(L.Callback):
    """Seconds from each training batch's start to its end: forward, backward, optimizer step
    and Lightning's hooks and logging, but not the data loader (the plain loop has none)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.durations: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        self.durations.append(time.perf_counter() - self._start)


def lightning_loop(module: GPTLightningModule, args: argparse.Namespace) -> list[float]:
    """Seconds of each timed step of Trainer.fit on random token windows (warm-up left out)."""
    num_windows = args.batch * (args.warmup + args.steps)
    windows = torch.randint(args.cfg.vocab_size, (num_windows, args.seq + 1))
    loader = DataLoader(TensorDataset(windows[:, :-1], windows[:, 1:]), batch_size=args.batch)
    timer = StepTimer(args.device)
    trainer = L.Trainer(
        accelerator=args.device.type,
        devices=[args.device.index] if args.device.index is not None else 1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_steps=args.warmup + args.steps,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.durations[args.warmup :]


def build_variants(
    args: argparse.Namespace, batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Callable[[], list[float]]]:
    """Each variant's name and a function running one round of it; all hold the same weights."""
    torch.manual_seed(0)
    ours = GPT(args.cfg).to(args.device)
    variants = {PLAIN: lambda: plain_loop(ours, ours, batch, args)}

    module = GPTLightningModule(args.cfg.to_dict(), OPTIMIZER, SCHEDULER)
    module.model.load_state_dict(ours.state_dict())
    variants[LIGHTNING] = lambda: lightning_loop(module, args)

    if args.compile:
        compiled_model = GPT(args.cfg).to(args.device)
        compiled_model.load_state_dict(ours.state_dict())
        compiled = torch.compile(compiled_model)
        variants[COMPILED] = lambda: plain_loop(compiled_model, compiled, batch, args)

    # config_to_hf sets every dropout to ours (0.0); transformers' own default would be 0.1.
    hf_config = transformers.GPT2Config(**config_to_hf(args.cfg), attn_implementation="sdpa")
    hf = transformers.GPT2LMHeadModel(hf_config).to(args.device)
    hf.load_state_dict(state_to_hf(ours), strict=False)  # lm_head is tied to wte, loaded with it
    # use_cache=False: a training step has no use for the key/value cache transformers would
    # otherwise build on every forward pass.
    variants[TRANSFORMERS] = lambda: plain_loop(
        hf, lambda x: hf(input_ids=x, use_cache=False).logits, batch, args
    )
    return variants


def flops_per_step(cfg: GPTConfig, batch: int, seq: int) -> int:
    """FLOPs of one forward + backward pass, counted by Lightning on the meta device.

    The count covers every matrix product, attention's included (the 6 x params x tokens rule
    leaves attention out); all variants do this same arithmetic.
    """
    with torch.device("meta"):
        model = GPT(cfg)
        x = torch.zeros(batch, seq, dtype=torch.long)
    return measure_flops(model, lambda: model(x), lambda logits: logits.sum())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keep_freed_memory()  # as training does: the large logits are not unmapped after every step
    disable_possible_user_warnings()  # e.g. "the dataloader has few workers": beside the point
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "GPU available: ..."
    # Lightning 2.6 uses torch's deprecated LeafSpec inside fit: a warning that is not ours.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

    generator = torch.Generator().manual_seed(1)
    windows = torch.randint(args.cfg.vocab_size, (args.batch, args.seq + 1), generator=generator)
    batch = windows[:, :-1].to(args.device), windows[:, 1:].to(args.device)
    variants = build_variants(args, batch)

    tokens_per_s: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run_round in variants.items():
            durations = run_round()
            tokens_per_s[name].append(args.batch * args.seq * len(durations) / sum(durations))

    # The peak is the fastest product of the precision's dtypes: bf16-mixed multiplies in bf16
    # where that is faster, and where it is not (a CPU without native bf16: ~100x slower here,
    # which gave MFUs above 100%) the fp32 peak is the honest bar.
    dtypes = [torch.float32] + ([torch.bfloat16] if args.precision == "bf16" else [])
    size = PEAK_MATMUL_SIZE_CUDA if args.device.type == "cuda" else PEAK_MATMUL_SIZE[args.quick]
    peak, dtype = max((peak_matmul_flops(args.device, d, size, repeats=5), d) for d in dtypes)
    flops_per_token = flops_per_step(args.cfg, args.batch, args.seq) / (args.batch * args.seq)

    median = {name: statistics.median(values) for name, values in tokens_per_s.items()}
    rows = []
    for name, values in tokens_per_s.items():
        rows.append(
            [
                name,
                f"{median[name]:,.1f}",
                f"{1000 * args.batch * args.seq / median[name]:,.1f}",
                f"{100 * median[name] * flops_per_token / peak:.2f}%",
                f"{median[name] / median[TRANSFORMERS]:.2f}x",
                f"{min(values):,.1f}-{max(values):,.1f}",
            ]
        )
    precision = "bf16-mixed" if args.precision == "bf16" else "fp32"
    with torch.device("meta"):  # only the count is needed: no memory, no init
        num_parameters = GPT(args.cfg).num_parameters()
    print(
        f"GPT-2 {args.size} ({num_parameters:,} parameters), "
        f"batch {args.batch} x {args.seq} tokens, {precision}, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"median of {args.repeats} round(s) of {args.steps} timed steps per variant "
        f"({args.warmup} warm-up step(s) each round, not timed)"
    )
    print(
        f"MFU: {flops_per_token / 1e6:,.1f} MFLOP per token (forward + backward) against a "
        f"measured peak of {peak / 1e9:,.1f} GFLOP/s ({size} x {size} {dtype} matmul)"
    )
    print()
    header = ["variant", "tokens/s", "ms/step", "MFU", "vs transformers", "tokens/s range"]
    print(markdown_table(header, rows))
    print()
    print(f"Lightning / plain loop: {median[LIGHTNING] / median[PLAIN]:.2f}x")
    if COMPILED in median:
        print(f"torch.compile / plain loop: {median[COMPILED] / median[PLAIN]:.2f}x")
    if args.chart:
        title = f"training GPT-2 {args.size}, {precision}, {args.device}: tokens/s"
        ratios = {name: speed / median[TRANSFORMERS] for name, speed in median.items()}
        save_ratio_chart(args.chart, title, ratios, "transformers")


if __name__ == "__main__":
    main()
