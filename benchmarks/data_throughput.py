"""Data pipeline: tokenization MB/s of tokenize_to_cache against bare tiktoken on the same text,
the start-up time of a warm cache, and the peak memory of each.

The corpus is generated: the embedded corpus's documents (Python's language reference) in a
seeded random order, repeated until it reaches --mb, written as --files text files. Each phase
runs in a fresh Python process, so its peak RSS is its own; the phases take turns over --repeats
rounds (each round with a cold cache of its own) and the median round is reported.

    python benchmarks/data_throughput.py            # 100 MB of text
    python benchmarks/data_throughput.py --quick    # 2 MB
    python benchmarks/data_throughput.py --chart docs/data.png   # and the ratio as a bar chart
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import markdown_table, peak_rss_mib, positive_int, save_ratio_chart, spawn_phase

MB = 10**6  # text sizes and speeds are in decimal MB; memory is in MiB
MiB = 2**20
TIKTOKEN = "tiktoken encode_ordinary_batch"
COLD = "tokenize_to_cache, cold cache"
WARM = "warm start"
PHASES = {"tiktoken": TIKTOKEN, "cold": COLD, "warm": WARM}
WARM_CONTEXT, WARM_BATCH = 1024, 8  # the windows of the first batch: GPT-2's context length

# Defaults of a full run and of --quick; an option given on the command line wins over both.
FULL = {"mb": 100, "repeats": 3}
QUICK = {"mb": 2, "repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=positive_int, help="MB of text to generate (default 100)")
    parser.add_argument("--files", type=positive_int, default=8, help="text files (default 8)")
    parser.add_argument("--repeats", type=positive_int, help="rounds over the phases (def. 3)")
    parser.add_argument("--seed", type=int, default=0, help="order of the documents (default 0)")
    parser.add_argument("--quick", action="store_true", help="2 MB, one round")
    parser.add_argument("--chart", type=Path, help="also save the ratio as a bar chart (PNG)")
    # The parent starts itself with these to run one phase in a fresh process.
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def write_corpus(folder: Path, num_bytes: int, num_files: int, seed: int) -> list[Path]:
    """About num_bytes of English prose in num_files .txt files; the same bytes for a seed."""
    from gpt2_lightning.tokens import embedded_documents

    documents = embedded_documents()
    rng = random.Random(seed)
    per_file = num_bytes // num_files
    files = []
    for i in range(num_files):
        # Whole shuffled passes over the documents, cut at per_file: every file is different
        # text for the hash, and real prose for the tokenizer (a fixed text would be cached).
        passes, size = [], 0
        while size < per_file:
            passes.append("\n\n".join(rng.sample(documents, len(documents))).encode())
            size += len(passes[-1])
        text = b"\n\n".join(passes)[:per_file].decode("utf-8", errors="ignore")
        path = folder / f"part{i:02d}.txt"
        path.write_text(text, encoding="utf-8")
        files.append(path)
    return files


def run_phase(args: argparse.Namespace) -> dict[str, float]:
    """One phase, in this (fresh) process: its seconds, token count and memory."""
    from gpt2_lightning.data import TextDataModule
    from gpt2_lightning.tokenizer import get_tokenizer
    from gpt2_lightning.tokens import load_tokens, tokenize_to_cache

    after_imports = peak_rss_mib()
    result: dict[str, float] = {}
    if args.phase == "tiktoken":
        # The tokenizer alone: texts already in memory, building the encoding not timed.
        enc = get_tokenizer()
        texts = [p.read_text(encoding="utf-8") for p in sorted(args.corpus.glob("*.txt"))]
        start = time.perf_counter()
        ids = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        result["seconds"] = time.perf_counter() - start
        result["tokens"] = sum(len(row) for row in ids)
    elif args.phase == "cold":
        get_tokenizer()  # built outside the timer too, as in the tiktoken phase
        start = time.perf_counter()
        file = tokenize_to_cache(args.corpus, args.cache_dir)
        result["seconds"] = time.perf_counter() - start
        result["tokens"] = file.stat().st_size // 2  # uint16 ids
    else:
        # What a training run does before its first step, once the cache exists.
        start = time.perf_counter()
        file = tokenize_to_cache(args.corpus, args.cache_dir)
        result["cache_hit"] = time.perf_counter() - start
        tokens = load_tokens(file)
        result["load_tokens"] = time.perf_counter() - start - result["cache_hit"]
        datamodule = TextDataModule(
            str(args.corpus), WARM_CONTEXT, WARM_BATCH, cache_dir=str(args.cache_dir)
        )
        datamodule.setup("fit")
        next(iter(datamodule.train_dataloader()))
        result["seconds"] = time.perf_counter() - start
        result["first_batch"] = result["seconds"] - result["cache_hit"] - result["load_tokens"]
        result["tokens"] = len(tokens)
    result["peak_rss_mib"] = peak_rss_mib()
    result["rss_after_imports_mib"] = after_imports
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.phase is not None:
        print(json.dumps(run_phase(args)))
        return

    with tempfile.TemporaryDirectory(prefix="data_throughput.") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        files = write_corpus(corpus, args.mb * MB, args.files, args.seed)
        text_mb = sum(f.stat().st_size for f in files) / MB
        results: dict[str, list[dict[str, float]]] = {phase: [] for phase in PHASES}
        for round_index in range(args.repeats):
            cache_dir = Path(tmp) / f"cache{round_index}"  # empty: this round's cold start
            for phase in PHASES:  # cold before warm: the warm start reads the cold one's cache
                results[phase].append(
                    spawn_phase(
                        __file__, phase, "--corpus", str(corpus), "--cache-dir", str(cache_dir)
                    )
                )

    def median(phase: str, key: str) -> float:
        return statistics.median(run[key] for run in results[phase])

    rows = []
    for phase, name in PHASES.items():
        seconds = median(phase, "seconds")
        speed = f"{text_mb / seconds:,.2f}" if phase != "warm" else "-"
        rows.append(
            [
                name,
                f"{seconds:,.3f}",
                speed,
                f"{median(phase, 'peak_rss_mib'):,.0f}",
                f"{median(phase, 'rss_after_imports_mib'):,.0f}",
            ]
        )
    bare_tokens = results["tiktoken"][0]["tokens"]
    cached_tokens = results["cold"][0]["tokens"]
    print(
        f"corpus: {len(files)} files, {text_mb:,.1f} MB of text, {cached_tokens:,} tokens; "
        f"as int64 (8 bytes each) {8 * cached_tokens / MiB:,.1f} MiB, "
        f"in the uint16 cache {2 * cached_tokens / MiB:,.1f} MiB"
    )
    print(
        f"median of {args.repeats} round(s), each phase in a fresh process; "
        f"{os.cpu_count()} CPUs; MB/s = MB of text per second"
    )
    print()
    header = ["phase", "seconds", "MB/s", "peak RSS (MiB)", "RSS after imports (MiB)"]
    print(markdown_table(header, rows))
    print()
    ratio = median("tiktoken", "seconds") / median("cold", "seconds")
    print(f"tokenize_to_cache / tiktoken: {ratio:.2f}x")
    print(
        f"warm start: cache hit {median('warm', 'cache_hit'):.3f} s, "
        f"load_tokens {median('warm', 'load_tokens'):.3f} s, "
        f"TextDataModule setup + first batch of {WARM_BATCH} x {WARM_CONTEXT} "
        f"{median('warm', 'first_batch'):.3f} s"
    )
    # One <|endoftext|> between consecutive files is the only difference the pipeline adds.
    agree = cached_tokens == bare_tokens + len(files)
    print(f"token counts agree (cache = tiktoken + one <|endoftext|> per file): {agree}")
    if args.chart:
        title = f"tokenizing {text_mb:.0f} MB of text into the cache, cold"
        ratios = {"tokenize_to_cache": ratio}
        save_ratio_chart(args.chart, title, ratios, "raw tiktoken encode_ordinary_batch")


if __name__ == "__main__":
    main()
