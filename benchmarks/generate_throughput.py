"""Greedy decoding tokens/s: our generate() with and without the KV cache against transformers'
generate(), with identical weights, and against the memory-bandwidth roofline.

For each shape, our GPT is built with a seeded random init, written as a Hugging Face folder and
loaded by transformers, so both decode with the same weights and must pick the same ids. The
variants take turns (round-robin) and the median round is reported.

    python benchmarks/generate_throughput.py           # 124M and small, batch 1 and 8, 64 tokens
    python benchmarks/generate_throughput.py --quick   # small shape, a few tokens
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers
from common import (
    markdown_table,
    positive_int,
    read_bandwidth,
    resolve_device,
    save_ratio_chart,
    timed,
)

from gpt2_lightning.generate import generate
from gpt2_lightning.model import GPT, GPTConfig
from gpt2_lightning.weights import EOS_ID

# "small" is the tiny size: emb 128, 4 layers, 4 heads, GPT-2's vocabulary, context 128.
SHAPES = {"124M": "124M", "small": "tiny"}
CACHED = "ours, KV cache"
UNCACHED = "ours, no cache"
LOW = "ours, KV cache, bf16 steps"  # generate(dtype=torch.bfloat16); ids may differ from fp32
HALF = "ours, KV cache, fp16 steps"  # generate(dtype=torch.float16); ids may differ from fp32
TRANSFORMERS = "transformers"

# Defaults of a full run and of --quick; an option given on the command line wins over both.
FULL = {"shapes": ["124M", "small"], "tokens": 64, "repeats": 3, "bandwidth_mib": 1024}
QUICK = {"shapes": ["small"], "tokens": 8, "repeats": 2, "bandwidth_mib": 256}

Decode = Callable[[int], torch.Tensor]  # new tokens -> (B, prompt + new) ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: 124M small")
    parser.add_argument(
        "--batches", nargs="+", type=positive_int, default=[1, 8], help="default: 1 8"
    )
    parser.add_argument("--tokens", type=positive_int, help="new tokens per run (default 64)")
    parser.add_argument("--prompt", type=positive_int, default=16, help="prompt tokens (def. 16)")
    parser.add_argument("--repeats", type=positive_int, help="rounds over the variants (def. 3)")
    parser.add_argument("--chart", type=Path, help="also save the ratios as a bar chart (PNG)")
    parser.add_argument(
        "--bandwidth-mib", type=positive_int, help="buffer for the bandwidth probe (def. 1024)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test of seconds: defaults --shapes small, --tokens 8, --repeats 2, "
        "--bandwidth-mib 256",
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = resolve_device(parser, args.device)
    for shape in args.shapes:
        context = GPTConfig.from_name(SHAPES[shape]).context_length
        if args.prompt + args.tokens > context:
            parser.error(
                f"--prompt {args.prompt} + --tokens {args.tokens} exceeds the context length "
                f"of shape {shape} ({context}): the window would slide, and no cache is used then"
            )
    return args


def same_weights(cfg: GPTConfig, device: torch.device) -> tuple[GPT, transformers.GPT2LMHeadModel]:
    """Our GPT with a seeded random init, and transformers' model loaded from its export."""
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(Path(tmp) / "model")
        theirs = transformers.GPT2LMHeadModel.from_pretrained(
            Path(tmp) / "model", attn_implementation="sdpa"
        )
    return ours.to(device), theirs.to(device).eval()


def decoders(
    ours: GPT, theirs: transformers.GPT2LMHeadModel, prompt: torch.Tensor
) -> dict[str, Decode]:
    """Each variant's name and a function decoding n tokens greedily after the prompt."""
    mask = torch.ones_like(prompt)
    variants: dict[str, Decode] = {
        CACHED: lambda n: generate(ours, prompt, n, temperature=0.0, use_cache=True),
        UNCACHED: lambda n: generate(ours, prompt, n, temperature=0.0, use_cache=False),
        LOW: lambda n: generate(ours, prompt, n, temperature=0.0, dtype=torch.bfloat16),
        HALF: lambda n: generate(ours, prompt, n, temperature=0.0, dtype=torch.float16),
        # min_new_tokens = max_new_tokens: exactly n tokens, as ours (no stop at <|endoftext|>).
        TRANSFORMERS: lambda n: theirs.generate(
            prompt,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=EOS_ID,
        ),
    }
    return variants


def weight_bytes_per_token(model: GPT, products_dtype: torch.dtype | None = None) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter once, the tied embedding
    included (the lm_head reads all of it), except the position table, of which one row is read.
    products_dtype: the Linear layers' parameters counted in that dtype (generate's dtype=).
    The KV cache's reads are left out: a few MB against hundreds at these lengths."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    linear = {id(p) for m in linears for p in m.parameters()}
    total = 0
    for p in model.parameters():
        size = p.element_size()
        if products_dtype is not None and id(p) in linear:
            size = products_dtype.itemsize
        total += p.numel() * size
    positions = model.pos_emb.weight
    return total - positions.nbytes + positions[0].nbytes


def measure(
    ours: GPT, theirs: transformers.GPT2LMHeadModel, batch: int, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, bool]]:
    """Median tokens/s of each variant on one batch of prompts, and whether each of ours
    picked exactly transformers' ids."""
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(ours.cfg.vocab_size, (batch, args.prompt), generator=generator)
    variants = decoders(ours, theirs, prompt.to(args.device))
    for decode in variants.values():
        decode(2)  # warm-up: first calls allocate, pick kernels and fill caches

    speeds: dict[str, list[float]] = {name: [] for name in variants}
    ids: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, decode in variants.items():
            seconds, ids[name] = timed(args.device, partial(decode, args.tokens))
            speeds[name].append(batch * args.tokens / seconds)
    median = {name: statistics.median(values) for name, values in speeds.items()}
    same_ids = {
        name: torch.equal(ids[name], ids[TRANSFORMERS]) for name in (CACHED, UNCACHED, LOW, HALF)
    }
    return median, same_ids


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights: 100%|..."

    rows, roofline_lines, all_equal, ratios = [], [], True, {}
    bandwidth = read_bandwidth(args.device, args.bandwidth_mib << 20, repeats=5)
    for shape in args.shapes:
        ours, theirs = same_weights(GPTConfig.from_name(SHAPES[shape]), args.device)
        batch_one_speed: dict[str, float] = {}
        for batch in args.batches:
            median, same_ids = measure(ours, theirs, batch, args)
            all_equal = all_equal and same_ids[CACHED] and same_ids[UNCACHED]
            for name, speed in median.items():
                if name != TRANSFORMERS:
                    ratios[f"{shape}, batch {batch}: {name}"] = speed / median[TRANSFORMERS]
                rows.append(
                    [
                        shape,
                        str(batch),
                        name,
                        f"{speed:,.1f}",
                        f"{1000 * batch / speed:,.2f}",
                        f"{speed / median[TRANSFORMERS]:.2f}x",
                        str(same_ids[name]) if name in same_ids else "-",
                    ]
                )
            if batch == 1:
                batch_one_speed = median

        for label, dtype, names in (
            (shape, None, (CACHED, TRANSFORMERS)),
            (f"{shape}, fp16 steps", torch.float16, (HALF,)),
        ):
            weight_bytes = weight_bytes_per_token(ours, dtype)
            ceiling = bandwidth / weight_bytes
            line = (
                f"{label}: {weight_bytes / 1e6:,.1f} MB of weights read per token -> at most "
                f"{ceiling:,.1f} tokens/s at batch 1"
            )
            if batch_one_speed:
                line += "; " + ", ".join(
                    f"{name} {100 * batch_one_speed[name] / ceiling:.0f}% of it" for name in names
                )
            roofline_lines.append(line)
        del ours, theirs  # both copies of the weights go before the next shape's are built

    print(
        f"greedy decoding of {args.tokens} tokens after a {args.prompt}-token prompt, fp32, "
        f"{args.device}, {torch.get_num_threads()} threads; median of {args.repeats} round(s) "
        "(tokens/s counts new tokens; the time includes the prompt's forward pass)"
    )
    print()
    header = ["shape", "batch", "variant", "tokens/s", "ms/step", "vs transformers", "same ids"]
    print(markdown_table(header, rows))
    print()
    print(f"greedy ids equal to transformers': {all_equal}")
    if args.chart:
        title = f"greedy decoding, {args.device}: tokens/s against transformers at the same batch"
        save_ratio_chart(args.chart, title, ratios, "transformers")
    print()
    print(
        f"roofline: memory read bandwidth {bandwidth / 1e9:,.1f} GB/s "
        f"(sum over {args.bandwidth_mib} MiB of fp32); weights that fit in the CPU's caches "
        "can beat it"
    )
    for line in roofline_lines:
        print(line)


if __name__ == "__main__":
    main()
