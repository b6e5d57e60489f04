"""HellaSwag items/s: our score_items (harness and completion style) against lm-evaluation-harness's
HFLM loglikelihood, on the same generated items and the same weights, in one process.

The weights are a randomly initialised GPT of the size's shape, exported to a Hugging Face folder
that HFLM loads (speed does not depend on the values). The items have HellaSwag's layout with its
lengths: a context of 40-80 tokens, four endings of 10-30. The variants take turns (round-robin),
so a change in machine load touches all of them alike; the median round is reported.

    python benchmarks/hellaswag_throughput.py                # 124M, 64 items, batch 8, fp32, CPU
    python benchmarks/hellaswag_throughput.py --repeats 5 --chart hellaswag.png
    python benchmarks/hellaswag_throughput.py --quick        # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from common import markdown_table, positive_int, save_ratio_chart

from gpt2_lightning.evaluate import ChoiceItem, load_hellaswag, score_items
from gpt2_lightning.model import ALIASES, GPT, SIZES, GPTConfig
from gpt2_lightning.tokenizer import get_tokenizer

HARNESS = "ours: harness style"
COMPLETION = "ours: completion style"
LM_EVAL = "lm-eval HFLM loglikelihood"

# Defaults of a full run and of --quick; an option given on the command line wins over both.
FULL = {"size": "124M", "items": 64, "batch": 8, "repeats": 3}
QUICK = {"size": "tiny", "items": 8, "batch": 4, "repeats": 2}
CONTEXT_TOKENS, ENDING_TOKENS = (40, 80), (10, 30)  # HellaSwag's validation set: ~30-100, ~5-50

WORDS = (
    "the a man woman person he she they is are was then and while with on in of to into over "
    "under his her their camera kitchen water ball rope bike car dog horse stage crowd table "
    "knife bowl paint brush hair mirror shows holds takes puts walks runs jumps speaks smiles "
    "begins continues finishes slowly quickly again next back up down around together"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=[*SIZES, *ALIASES], help="model size (default 124M)")
    parser.add_argument("--items", type=positive_int, help="items per round (default 64)")
    parser.add_argument(
        "--batch",
        type=positive_int,
        help="items per batch (default 8); lm-eval gets 4x as many requests, the same rows",
    )
    parser.add_argument("--repeats", type=positive_int, help="rounds over the variants (def. 3)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    parser.add_argument("--chart", type=Path, help="also save the ratios as a bar chart (PNG)")
    quick = ", ".join(f"--{key} {value}" for key, value in QUICK.items())
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke test of seconds: defaults {quick}"
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.cfg = GPTConfig.from_name(args.size)
    return args


def text_of(rng: random.Random, num_tokens: int) -> str:
    """Words drawn at random until the text is num_tokens GPT-2 tokens long (a word each here)."""
    enc = get_tokenizer()
    words = [rng.choice(WORDS) for _ in range(num_tokens)]
    text = " ".join(words)
    assert len(enc.encode(" " + text)) == num_tokens  # every word above is one token after " "
    return text


def make_items(count: int, seed: int = 0) -> list[dict]:
    """HellaSwag-layout documents: activity_label, ctx_a, ctx_b, ctx, four endings, label."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        context = text_of(rng, rng.randint(*CONTEXT_TOKENS) - 3)  # the label and ": " add ~3
        half = len(context) // 2
        ctx_a, ctx_b = context[:half].rstrip(), context[half:].lstrip()
        endings = [text_of(rng, rng.randint(*ENDING_TOKENS)) + "." for _ in range(4)]
        docs.append(
            {
                "activity_label": "Doing things",
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": ctx_a + " " + ctx_b,
                "endings": endings,
                "label": rng.randrange(4),
            }
        )
    return docs


def harness_model(folder: Path, batch: int) -> Callable[[list[ChoiceItem]], list[float]]:
    """lm-evaluation-harness's HFLM on the exported folder: the items' log-likelihoods, each
    ending's request (query, " " + choice) as its hellaswag task builds them."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=batch, dtype="float32")

    def run(items: list[ChoiceItem]) -> list[float]:
        requests = [
            Instance(request_type="loglikelihood", doc={}, arguments=(item.query, " " + c), idx=k)
            for item in items
            for k, c in enumerate(item.choices)
        ]
        return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]

    return run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lm_eval")

    torch.manual_seed(0)
    model = GPT(args.cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "hf")
        items_file = Path(tmp) / "items.jsonl"
        docs = make_items(args.items)
        items_file.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        items = load_hellaswag(items_file)
        harness = harness_model(Path(tmp) / "hf", 4 * args.batch)  # a request: one ending

    def ours(style: str) -> Callable[[], list[float]]:
        def run() -> list[float]:
            scores = score_items(model, items, style, batch_size=args.batch)
            return [ll for score in scores for ll in score.logprobs]

        return run

    variants = {
        HARNESS: ours("harness"),
        COMPLETION: ours("completion"),
        LM_EVAL: lambda: harness(items),
    }
    warm = items[: args.batch]  # first calls' allocations and thread pools, untimed
    score_items(model, warm, "harness", batch_size=args.batch)
    harness(warm)

    items_per_s: dict[str, list[float]] = {name: [] for name in variants}
    lls: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, run_round in variants.items():
            start = time.perf_counter()
            lls[name] = run_round()
            items_per_s[name].append(len(items) / (time.perf_counter() - start))

    median = {name: statistics.median(values) for name, values in items_per_s.items()}
    # Harness style computes what HFLM computes: the same log-likelihood for every ending.
    difference = max(abs(a - b) for a, b in zip(lls[HARNESS], lls[LM_EVAL], strict=True))
    rows = [
        [
            name,
            f"{median[name]:,.2f}",
            f"{1000 / median[name]:,.1f}",
            f"{median[name] / median[LM_EVAL]:.2f}x",
            f"{min(values):,.2f}-{max(values):,.2f}",
        ]
        for name, values in items_per_s.items()
    ]
    enc = get_tokenizer()
    contexts = [len(enc.encode(item.query)) for item in items]
    endings = [len(enc.encode(" " + c)) for item in items for c in item.choices]
    print(
        f"GPT-2 {args.size} shape ({model.num_parameters():,} parameters, random weights), fp32, "
        f"cpu, {torch.get_num_threads()} threads; {len(items)} items of 4 endings (context "
        f"{min(contexts)}-{max(contexts)} tokens, mean {statistics.mean(contexts):.0f}; endings "
        f"{min(endings)}-{max(endings)}, mean {statistics.mean(endings):.0f}); batches of "
        f"{args.batch} items (ours) and {4 * args.batch} requests (lm-eval): "
        f"{4 * args.batch} endings each"
    )
    print(f"median of {args.repeats} round(s) over all items per variant, after one warm-up batch")
    print()
    header = ["variant", "items/s", "ms/item", "vs lm-eval", "items/s range"]
    print(markdown_table(header, rows))
    print()
    print(f"ours (harness style) / lm-eval: {median[HARNESS] / median[LM_EVAL]:.2f}x")
    # Each round's own ratio: both sides of it saw the same load, whatever the load did between.
    rounds = zip(items_per_s[HARNESS], items_per_s[LM_EVAL], strict=True)
    per_round = [ours / theirs for ours, theirs in rounds]
    print(
        f"per round, ours (harness style) / lm-eval: median {statistics.median(per_round):.2f}x, "
        f"range {min(per_round):.2f}-{max(per_round):.2f}x"
    )
    print(f"log-likelihoods, harness style vs lm-eval (max abs difference): {difference:.2e}")
    if args.chart:
        title = f"HellaSwag scoring, GPT-2 {args.size} shape, fp32, cpu: items/s"
        ratios = {name: speed / median[LM_EVAL] for name, speed in median.items()}
        save_ratio_chart(args.chart, title, ratios, "lm-eval HFLM")


if __name__ == "__main__":
    main()
