"""Corpora: `prepare --out` tokens/s per core against one process of raw tiktoken, its peak
memory at two corpus sizes, and a warm start on a folder of token shards.

The corpus is generated: a JSON Lines file of documents of 1-5 KB, each made of the embedded
corpus's paragraphs (Python's language reference and standard-library docstrings) drawn with a
seeded RNG. Each phase runs in a fresh Python process, imports outside its timer; the baseline
and prepare take turns over --repeats rounds and the median round is reported. While a phase
runs, this process reads the peak RSS (VmHWM) of the phase and of each of its pool workers from
/proc every 0.25 s, and the whole tree's PSS every 5 s once the workers exist (Linux; no psutil).

    python benchmarks/prepare_throughput.py            # 100 MB and 1 GB of jsonl, 1 GiB of shards
    python benchmarks/prepare_throughput.py --quick    # 2 and 4 MB, 8 MiB of shards
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import markdown_table, own_peak_rss_mib, positive_int, save_ratio_chart

MB = 10**6  # text sizes are in decimal MB; memory is in MiB
MiB = 2**20
PHASES = {"tiktoken": "tiktoken encode_ordinary, 1 process", "prepare": "prepare_shards"}
CONTEXT, BATCH = 1024, 8  # the warm start's windows: GPT-2's context length
# /proc is read this often while a phase runs: VmHWM costs ~1 ms a read, but the PSS
# (smaps_rollup walks the page tables) ~60 ms a process, so it is read seldom.
POLL_SECONDS, PSS_POLLS = 0.25, 20

# Defaults of a full run and of --quick; an option given on the command line wins over both.
FULL = {"mb": 100, "large_mb": 1000, "shards_mib": 1024, "repeats": 3, "shard_tokens": 10**8}
QUICK = {"mb": 2, "large_mb": 4, "shards_mib": 8, "repeats": 1, "shard_tokens": 200_000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=positive_int, help="MB of jsonl timed (default 100)")
    parser.add_argument("--large-mb", type=positive_int, help="MB of the 2nd size (default 1000)")
    parser.add_argument("--shards-mib", type=positive_int, help="MiB of shards (default 1024)")
    parser.add_argument("--repeats", type=positive_int, help="rounds over the phases (default 3)")
    parser.add_argument("--workers", type=positive_int, help="prepare's (default: all cores)")
    parser.add_argument("--shard-tokens", type=positive_int, help="default 10^8 (val: 1/100)")
    parser.add_argument("--seed", type=int, default=0, help="the documents (default 0)")
    parser.add_argument("--quick", action="store_true", help="2 and 4 MB, 8 MiB, one round")
    parser.add_argument("--chart", type=Path, help="also save the ratios as a bar chart (PNG)")
    # The parent starts itself with these to run one phase in a fresh process.
    parser.add_argument("--phase", choices=[*PHASES, "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workers = args.workers or os.cpu_count() or 1
    return args


def embedded_paragraphs() -> list[str]:
    """The paragraphs of the embedded corpus's documents, in their order."""
    from gpt2_lightning.tokens import embedded_documents

    return [p for doc in embedded_documents() for p in doc.split("\n\n") if p.strip()]


def write_corpus(file: Path, num_bytes: int, seed: int, paragraphs: list[str]) -> int:
    """About num_bytes of JSON Lines, {"text": ...} documents of 1-5 KB of paragraphs drawn at
    random; the same bytes for a seed. Returns the number of documents."""
    rng = random.Random(seed)
    count, size = 0, 0
    with open(file, "w", encoding="utf-8") as out:
        while size < num_bytes:
            target, parts, length = rng.randint(1000, 5000), [], 0
            while length < target:
                parts.append(rng.choice(paragraphs))
                length += len(parts[-1]) + 2
            text = "\n\n".join(parts)[:target]
            text = text[: text.rfind(" ")] if " " in text else text  # end on a whole word
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            out.write(line)
            size, count = size + len(line.encode()), count + 1
    return count


def write_shard_folder(folder: Path, num_bytes: int) -> int:
    """A validation shard and four training shards of random ids (seed 0), num_bytes of tokens
    in all, as llm.c's .bin. Returns the number of tokens."""
    from gpt2_lightning.shards import write_shard
    from gpt2_lightning.tokens import VOCAB_SIZE

    rng = np.random.default_rng(0)
    total = num_bytes // 2
    sizes = [total // 8, *[(total - total // 8) // 4] * 4]
    for number, size in enumerate(sizes):
        split = "val" if number == 0 else "train"
        ids = rng.integers(0, VOCAB_SIZE, size, dtype=np.uint16)
        write_shard(folder / f"shard_{split}_{number:06d}.bin", ids)
    return sum(sizes)


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_phase(args: argparse.Namespace) -> dict[str, float]:
    """One phase, in this (fresh) process: its seconds, tokens, CPU time and peak memory."""
    start = time.perf_counter()
    if args.phase != "tiktoken":
        # What `python -m gpt2_lightning.data` imports (Lightning): the memory is the command's.
        from gpt2_lightning.data import TextDataModule
    from gpt2_lightning.records import read_records
    from gpt2_lightning.shards import prepare_shards, read_shard
    from gpt2_lightning.tokenizer import get_tokenizer
    from gpt2_lightning.tokens import resolve_source

    result = {"imports": time.perf_counter() - start, "rss_after_imports_mib": own_peak_rss_mib()}
    if args.phase == "tiktoken":
        # The bare tokenizer: the documents in memory, the encoding built, neither timed.
        texts = list(read_records(args.corpus))
        enc = get_tokenizer()
        cpu, start = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
        result["tokens"] = sum(len(enc.encode_ordinary(text)) for text in texts)
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = cpu_seconds(resource.RUSAGE_SELF) - cpu
    elif args.phase == "prepare":
        # What `prepare <jsonl> --out <folder> --workers N` runs: read, tokenize, write shards.
        get_tokenizer()  # built outside the timer (~1 s), as in the tiktoken phase: forked
        cpu, start = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
        source = resolve_source(str(args.corpus))
        files = prepare_shards(
            source.pieces(),
            args.out,
            args.shard_tokens,
            val_tokens=args.shard_tokens // 100,
            workers=args.workers,
            progress=False,
            source=source.name,
        )
        result["seconds"] = time.perf_counter() - start
        # The pool's workers have been joined: their CPU time and peak RSS are counted here.
        result["main_cpu_seconds"] = cpu_seconds(resource.RUSAGE_SELF) - cpu
        result["workers_cpu_seconds"] = cpu_seconds(resource.RUSAGE_CHILDREN)
        result["cpu_seconds"] = result["main_cpu_seconds"] + result["workers_cpu_seconds"]
        result["largest_worker_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result["tokens"] = sum(len(read_shard(file)) for file in files)
        result["shards"] = len(files)
    else:  # a warm start on shards: a memory map of each, no token read
        start = time.perf_counter()
        datamodule = TextDataModule(str(args.corpus), CONTEXT, BATCH)
        datamodule.setup("fit")
        result["seconds"] = time.perf_counter() - start
        result["train_windows"] = len(datamodule.train_set)
        result["val_windows"] = len(datamodule.val_set)
    result["peak_rss_mib"] = own_peak_rss_mib()
    return result


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/<pid>/task/*/children (empty where there is none)."""
    pids = [pid]
    for file in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            children = Path(file).read_text().split()
        except OSError:  # the thread or process ended
            continue
        for child in children:
            pids += _tree(int(child))
    return pids


def _status_kib(pid: int, file: str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # it ended
        return None
    return None


def spawn_sampled(phase: str, *args: str) -> dict[str, float]:
    """Run one phase in a fresh process, its JSON line plus what /proc said of its tree: the
    workers' peak RSS summed (each VmHWM as last read) and the peak of the tree's summed PSS."""
    command = [sys.executable, __file__, "--phase", phase, *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    peak_pss, pss_poll = 0, -PSS_POLLS
    for poll in itertools.count():
        if process.poll() is not None:
            break
        tree = _tree(process.pid)
        for pid in tree:
            hwm = _status_kib(pid, "status", "VmHWM")
            if hwm is not None:
                peaks[pid] = max(peaks.get(pid, 0), hwm)
        if len(tree) > 1 and poll - pss_poll >= PSS_POLLS:  # from the pool's start on
            pss_poll = poll
            pss = sum(_status_kib(pid, "smaps_rollup", "Pss") or 0 for pid in tree)
            peak_pss = max(peak_pss, pss)
        time.sleep(POLL_SECONDS)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"phase {phase!r} failed:\n{stderr}")
    result = json.loads(stdout.strip().splitlines()[-1])
    workers = [kib for pid, kib in peaks.items() if pid != process.pid]
    result["workers_peak_rss_mib"] = sum(workers) / 1024
    # 0: the pool lived between two polls (--quick's small corpora), so its PSS was never read
    result["peak_pss_mib"] = peak_pss / 1024
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.phase is not None:
        print(json.dumps(run_phase(args)))
        return
    options = ["--workers", str(args.workers), "--shard-tokens", str(args.shard_tokens)]

    def prepare(corpus: Path, out: Path) -> dict[str, float]:
        return spawn_sampled("prepare", "--corpus", str(corpus), "--out", str(out), *options)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="prepare_throughput.") as tmp:
        corpus, large = Path(tmp) / "corpus.jsonl", Path(tmp) / "large.jsonl"
        paragraphs = embedded_paragraphs()
        documents = write_corpus(corpus, args.mb * MB, args.seed, paragraphs)
        corpus_mb = corpus.stat().st_size / MB
        results: dict[str, list[dict[str, float]]] = {phase: [] for phase in PHASES}
        for round_index in range(args.repeats):
            out = Path(tmp) / f"shards{round_index}"
            results["tiktoken"].append(spawn_sampled("tiktoken", "--corpus", str(corpus)))
            results["prepare"].append(prepare(corpus, out))
            for file in out.iterdir():  # the disk a round needs, not a multiple of it
                file.unlink()
        corpus.unlink()
        write_corpus(large, args.large_mb * MB, args.seed, paragraphs)
        large_mb = large.stat().st_size / MB
        large_run = prepare(large, Path(tmp) / "large_shards")
        large.unlink()
        for file in (Path(tmp) / "large_shards").iterdir():
            file.unlink()
        folder = Path(tmp) / "warm"
        folder.mkdir()
        warm_tokens = write_shard_folder(folder, args.shards_mib * MiB)
        warm = [spawn_sampled("warm", "--corpus", str(folder)) for _ in range(args.repeats)]
    load_after = os.getloadavg()[0]

    def median(phase: str, key: str) -> float:
        return statistics.median(run[key] for run in results[phase])

    bare_tokens = results["tiktoken"][0]["tokens"]
    cores = {"tiktoken": 1, "prepare": args.workers}
    speeds = {phase: bare_tokens / median(phase, "seconds") for phase in PHASES}
    rows = [
        [
            name,
            f"{median(phase, 'seconds'):,.2f}",
            f"{speeds[phase]:,.0f}",
            str(cores[phase]),
            f"{speeds[phase] / cores[phase]:,.0f}",
            f"{bare_tokens / median(phase, 'cpu_seconds'):,.0f}",
            f"{median(phase, 'peak_rss_mib'):,.0f}",
        ]
        for phase, name in PHASES.items()
    ]
    print(
        f"corpus: {documents:,} documents of 1-5 KB, {corpus_mb:,.1f} MB of jsonl, "
        f"{bare_tokens:,} tokens (tiktoken's, no <|endoftext|>)"
    )
    print(
        f"median of {args.repeats} round(s), each phase in a fresh process, imports untimed; "
        f"{os.cpu_count()} CPUs; prepare: --workers {args.workers}, --shard-tokens "
        f"{args.shard_tokens:,}, --val-tokens {args.shard_tokens // 100:,}; tokens/s counts "
        "tiktoken's tokens"
    )
    print(f"load average (1 min) before / after the run: {load_before:.2f} / {load_after:.2f}")
    print()
    header = ["phase", "seconds", "tokens/s", "cores", "tokens/s per core", "tokens/CPU-s"]
    print(markdown_table([*header, "peak RSS (MiB)"], rows))
    print()
    per_core = speeds["prepare"] / args.workers / speeds["tiktoken"]
    per_cpu = median("tiktoken", "cpu_seconds") / median("prepare", "cpu_seconds")
    print(f"prepare per core / tiktoken: {per_core:.2f}x")
    print(f"prepare per CPU-second / tiktoken: {per_cpu:.2f}x")
    print(
        f"prepare's CPU seconds: {median('prepare', 'main_cpu_seconds'):.2f} in the process "
        f"(reading, batching, writing), {median('prepare', 'workers_cpu_seconds'):.2f} in the "
        f"workers; tiktoken's: {median('tiktoken', 'cpu_seconds'):.2f}"
    )
    # Below the cores given, the machine's other work took the rest: the wall-clock ratio is
    # then the machine's, and the CPU-second one says what the code costs.
    used = {phase: median(phase, "cpu_seconds") / median(phase, "seconds") for phase in PHASES}
    print(
        f"cores used on average (CPU s / s): tiktoken {used['tiktoken']:.2f} of 1, "
        f"prepare {used['prepare']:.2f} of {args.workers}"
    )
    shard_tokens = results["prepare"][0]["tokens"]
    agree = shard_tokens == bare_tokens + documents
    print(f"token counts agree (shards = tiktoken + one <|endoftext|> per document): {agree}")
    print()

    small = {key: median("prepare", key) for key in results["prepare"][0]}
    memory_rows = [
        [
            f"{size_mb:,.0f} MB",
            f"{run['tokens']:,.0f}",
            f"{run['shards']:.0f}",
            f"{run['seconds']:,.1f}",
            f"{run['peak_rss_mib']:,.0f}",
            f"{run['largest_worker_mib']:,.0f}",
            f"{run['workers_peak_rss_mib']:,.0f}",
            f"{run['peak_pss_mib']:,.0f}" if run["peak_pss_mib"] else "-",
        ]
        for size_mb, run in ((corpus_mb, small), (large_mb, large_run))
    ]
    print(
        "peak memory of prepare: the process (VmHWM), its largest worker (RUSAGE_CHILDREN), "
        "the workers' peaks summed (VmHWM; each counts the pages it shares with the process) and "
        f"the peak of the tree's PSS (read every {POLL_SECONDS * PSS_POLLS:.0f} s)"
    )
    print()
    header = ["jsonl", "tokens", "shards", "seconds", "process peak RSS (MiB)"]
    header += ["largest worker (MiB)", "workers summed (MiB)", "peak PSS, all (MiB)"]
    print(markdown_table(header, memory_rows))
    print()
    seconds = statistics.median(run["seconds"] for run in warm)
    print(
        f"warm start: {args.shards_mib:,} MiB of shards (5 .bin files, one *val*, {warm_tokens:,} "
        f"tokens): TextDataModule + setup {seconds:.3f} s, "
        f"peak RSS {statistics.median(run['peak_rss_mib'] for run in warm):,.0f} MiB, "
        f"{warm[0]['train_windows']:,.0f} + {warm[0]['val_windows']:,.0f} windows of {CONTEXT}"
    )
    print(
        f"warm start imports (gpt2_lightning.data): "
        f"{statistics.median(run['imports'] for run in warm):.2f} s, "
        f"RSS after them {statistics.median(run['rss_after_imports_mib'] for run in warm):,.0f} MiB"
    )
    if args.chart:
        ratios = {"prepare, tokens/s per core": per_core, "prepare, tokens per CPU-s": per_cpu}
        title = (
            f"prepare --workers {args.workers} against one tiktoken process ({corpus_mb:.0f} MB)"
        )
        save_ratio_chart(args.chart, title, ratios, "one tiktoken process")


if __name__ == "__main__":
    main()
