"""Start-up on a large token cache: what a run does before its first step, with the checksum that a
start pays for a cache file up to 1 GiB, and without it (size only: what a start did before).

The cache is generated: --mib MiB of random GPT-2 ids (uint16) written with numpy, with the record
gpt2_lightning.tokens keeps beside it, under the cache key of a one-line source file (so
tokenize_to_cache finds it as it would a corpus tokenized earlier). Each phase runs in a fresh
Python process; the phases take turns over --repeats rounds and the median round is reported.
The file was just written, so it is in the page cache: a cold disk reads it at the disk's speed.

    python benchmarks/cache_startup.py              # 1 GiB (1024 MiB), 3 rounds
    python benchmarks/cache_startup.py --quick      # 64 MiB, one round
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from common import markdown_table, peak_rss_mib, positive_int, spawn_phase

MiB = 2**20
CONTEXT, BATCH = 1024, 8  # the first batch's windows: GPT-2's context length
PHASES = {"size": "size only (before)", "checksum": "size + CRC-32 (now)"}
FULL = {"mib": 1024, "repeats": 3}
QUICK = {"mib": 64, "repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=positive_int, help="MiB of token cache (default 1024)")
    parser.add_argument("--repeats", type=positive_int, help="rounds over the phases (default 3)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, one round")
    # The parent starts itself with these to run one phase in a fresh process.
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def write_cache(source: Path, cache_dir: Path, num_bytes: int) -> Path:
    """Random ids as the cache file of source, with its record; written in blocks."""
    from gpt2_lightning import tokens

    source.write_text("a one-line corpus whose cache file is generated\n", encoding="utf-8")
    target = cache_dir / f"{tokens.cache_key(tokens.resolve_source(source))}.bin"
    cache_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    count, crc, max_id, block = 0, 0, -1, 32 * MiB // 2
    with open(target, "wb") as out:
        while count < num_bytes // 2:
            ids = rng.integers(0, tokens.VOCAB_SIZE, min(block, num_bytes // 2 - count), np.uint16)
            out.write(ids)
            count, crc, max_id = count + len(ids), zlib.crc32(ids, crc), max(max_id, ids.max())
    record = tokens.CacheRecord(count, "uint16", crc, int(max_id), tokens.TOKENIZER, str(source))
    tokens.write_record(target, record)
    return target


def run_phase(args: argparse.Namespace) -> dict[str, float]:
    """One start, in this (fresh) process: the seconds of each of its parts."""
    from gpt2_lightning import tokens
    from gpt2_lightning.data import TextDataModule

    if args.phase == "size":
        tokens.CHECKSUM_BYTES = 0  # every file counts as large: checked by its size only
    start = time.perf_counter()
    datamodule = TextDataModule(str(args.source), CONTEXT, BATCH, cache_dir=str(args.cache_dir))
    datamodule.prepare_data()  # orphans, then tokenize_to_cache: an index hit, checked
    found = time.perf_counter()
    datamodule.setup("fit")  # load_tokens (a memory map), the windows
    set_up = time.perf_counter()
    next(iter(datamodule.train_dataloader()))
    end = time.perf_counter()
    return {
        "cache_hit": found - start,
        "setup": set_up - found,
        "first_batch": end - set_up,
        "seconds": end - start,
        "peak_rss_mib": peak_rss_mib(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.phase is not None:
        print(json.dumps(run_phase(args)))
        return
    from gpt2_lightning import tokens

    with tempfile.TemporaryDirectory(prefix="cache_startup.") as tmp:
        source, cache_dir = Path(tmp) / "corpus.txt", Path(tmp) / "cache"
        target = write_cache(source, cache_dir, args.mib * MiB)
        assert tokens.tokenize_to_cache(source, cache_dir) == target  # checked; the index written
        start = time.perf_counter()
        tokens.checksum(target)
        crc_seconds = time.perf_counter() - start
        results: dict[str, list[dict[str, float]]] = {phase: [] for phase in PHASES}
        for _ in range(args.repeats):
            for phase in PHASES:
                results[phase].append(
                    spawn_phase(
                        __file__, phase, "--source", str(source), "--cache-dir", str(cache_dir)
                    )
                )
        size = target.stat().st_size

    def median(phase: str, key: str) -> float:
        return statistics.median(run[key] for run in results[phase])

    keys = ("cache_hit", "setup", "first_batch", "seconds", "peak_rss_mib")
    rows = [
        [
            name,
            *(f"{median(phase, key):,.3f}" for key in keys[:-1]),
            f"{median(phase, keys[-1]):,.0f}",
        ]
        for phase, name in PHASES.items()
    ]
    print(
        f"token cache: {size / MiB:,.0f} MiB, {size // 2:,} random ids; median of {args.repeats} "
        "round(s), each phase in a fresh process; the file in the page cache"
    )
    print()
    header = ["start", "cache hit + checks (s)", "setup (s)", f"first batch {BATCH}x{CONTEXT} (s)"]
    print(markdown_table([*header, "total (s)", "peak RSS (MiB)"], rows))
    print()
    extra = median("checksum", "seconds") - median("size", "seconds")
    print(f"the checksum's cost at start: {extra:+.3f} s")
    print(f"CRC-32 of the file alone: {crc_seconds:.3f} s ({size / crc_seconds / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
