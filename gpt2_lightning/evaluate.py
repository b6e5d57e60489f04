"""Evaluation: perplexity and bits per byte on a corpus; multiple-choice accuracy on HellaSwag or
any file of its layout, scored the two ways that papers and repositories report.

    python -m gpt2_lightning.evaluate checkpoint=124M task=perplexity path=my_texts/
    python -m gpt2_lightning.evaluate checkpoint=124M task=hellaswag      # downloads the file once
    python -m gpt2_lightning.evaluate checkpoint=last.ckpt task=multiple_choice path=items.jsonl

The choice tasks' two styles, each named by where it comes from:
- completion (build-nanogpt's hellaswag.py, llm.c): the context is `ctx`, each candidate
  " " + ending, encoded separately; acc picks the ending with the largest summed log-probability,
  acc_norm the one with the largest mean log-probability per token (build-nanogpt's argmin of the
  summed and of the mean loss).
- harness (lm-evaluation-harness's `hellaswag` task, its HFLM model): the context is the task's
  query, each candidate " " + choice; context + candidate is encoded whole and the context's own
  tokens cut off, after the context's trailing whitespace has moved into the candidate; acc picks
  the largest summed log-probability, acc_norm the largest log-probability per character of the
  choice (without the " "). For HellaSwag, query = preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize()) and each choice = preprocess(ending), as lm_eval/tasks/hellaswag/utils.py
  does; for task=multiple_choice, whose items have no such fields, query = ctx and the choices are
  the endings as written.
A context and candidate longer than the model's context keep their last context_length + 1 tokens
(the model reads all but the last), as the harness does; a candidate must fit in the context.

results.json: {"model": <checkpoint as given>, "date": <ISO 8601>, "results": [{"task", "metric",
"style", "value", "items"}, ...]}: metric loss (nats per token), ppl, bpb (bits per byte) with
style null, or acc and acc_norm with style completion or harness; items is the count the value is
an average over (tokens for loss and ppl, bytes for bpb, questions for acc and acc_norm).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import hydra
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from gpt2_lightning.checks import check_integer, is_integer
from gpt2_lightning.cli import CONF, check_command_line, one_line_errors, torch_device
from gpt2_lightning.files import atomic_file, cache_home
from gpt2_lightning.model import GPT, KVCache
from gpt2_lightning.tokenizer import get_tokenizer
from gpt2_lightning.tokens import VOCAB_SIZE, corpus_arrays, corpus_source
from gpt2_lightning.weights import load_weights

TASKS = ("perplexity", "hellaswag", "multiple_choice")
STYLES = ("completion", "harness")
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DELIMITER = " "  # before each candidate: the harness's target_delimiter, build-nanogpt's " "
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Perplexity and bits per byte


def corpus_tokens(
    path: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """The token ids of a corpus in any format data.path takes (None = the embedded one): its
    shards, or its documents through the token cache."""
    arrays = [ids for _, ids in corpus_arrays(corpus_source(path, "path"), cache_dir, True)]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


@dataclass(frozen=True)
class Window:
    """Inputs ids[begin:end] predict ids[begin + 1:end + 1]; the first `skip` targets were
    scored by the window before."""

    begin: int
    end: int
    skip: int


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """Hugging Face's fixed-length-model windows: every token after the first scored once."""
    # Each window reads a full context and moves on by stride; it scores only the targets past
    # the previous window's, so each sees at least context_length - stride + 1 tokens (all there
    # are in the first window). The last window is cut short at the corpus's end. A window is
    # Hugging Face's of context_length + 1 tokens, the last a target only: the model reads a full
    # context, and a stride of context_length skips no token where two windows meet.
    windows, scored = [], 0  # scored: the targets up to ids[scored] have their loss
    for begin in range(0, num_tokens - 1, stride):
        end = min(begin + context_length, num_tokens - 1)
        windows.append(Window(begin, end, scored - begin))
        scored = end
        if end == num_tokens - 1:
            break
    return windows


@cache
def _token_bytes() -> np.ndarray:
    """The UTF-8 bytes each GPT-2 id stands for; 0 for <|endoftext|>, a separator, not text."""
    enc = get_tokenizer()
    sizes = [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    sizes[enc.eot_token] = 0
    return np.array(sizes, dtype=np.int64)


def perplexity(
    model: GPT,
    ids: np.ndarray | Sequence[int],
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """Mean loss (nats per token), perplexity, bits per byte, and the tokens and bytes scored.

    stride: how far each window of the model's context moves on (None = half the context).
    bpb leaves out the targets that are <|endoftext|>; loss and ppl count every target.
    """
    context = model.cfg.context_length
    stride = max(1, context // 2) if stride is None else stride
    if not is_integer(stride) or not 1 <= stride <= context:
        raise ValueError(
            f"stride={stride!r} is invalid: must be an integer in [1, context_length={context}]"
        )
    if len(ids) < 2:
        raise ValueError(f"the corpus has {len(ids)} token(s): at least 2 are needed to score one")
    device = _device_of(model)
    eot = get_tokenizer().eot_token
    token_bytes = _token_bytes()
    windows = rank_split(sliding_windows(len(ids), context, stride))
    nats, text_nats, tokens, num_bytes = 0.0, 0.0, 0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=_bar(progress))
    with bar, _evaluating(model):
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size]
            width = max(w.end - w.begin for w in batch)
            inputs = np.zeros((len(batch), width), dtype=np.int64)  # right-padded: causal
            targets = np.zeros((len(batch), width), dtype=np.int64)  # attention ignores the pad
            scored = np.zeros((len(batch), width), dtype=bool)
            for row, w in enumerate(batch):
                inputs[row, : w.end - w.begin] = ids[w.begin : w.end]
                targets[row, : w.end - w.begin] = ids[w.begin + 1 : w.end + 1]
                scored[row, w.skip : w.end - w.begin] = True
            logits = model(torch.from_numpy(inputs).to(device))  # (B, T, vocab_size)
            mask = torch.from_numpy(scored).to(device)
            target = torch.from_numpy(targets).to(device)[mask]
            loss = F.cross_entropy(logits[mask].float(), target, reduction="none").double()
            is_text = target != eot
            nats += loss.sum().item()
            text_nats += loss[is_text].sum().item()
            tokens += int(mask.sum())
            num_bytes += int(token_bytes[targets[scored]].sum())
            bar.update(len(batch))
    nats, text_nats, tokens, num_bytes = _sum_across_ranks(
        [nats, text_nats, tokens, num_bytes], device
    )
    loss = nats / tokens
    return {
        "loss": loss,
        "ppl": math.exp(loss) if loss < 700 else math.inf,  # exp overflows past ~709
        "bpb": text_nats / math.log(2) / num_bytes if num_bytes else math.nan,
        "tokens": int(tokens),
        "bytes": int(num_bytes),
    }


# ---------------------------------------------------------------------------------------------
# Multiple choice: the items


@dataclass(frozen=True)
class ChoiceItem:
    """One question in both styles' texts: completion style reads context and endings, harness
    style query and choices; label is the index of the right ending."""

    context: str
    endings: tuple[str, ...]
    label: int
    query: str
    choices: tuple[str, ...]


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning: WikiHow's [title] and [step] tags out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_file() -> Path:
    """The official HellaSwag validation file, downloaded once into the cache."""
    target = cache_home("hellaswag") / "hellaswag_val.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as response:
            with atomic_file(target) as out:
                shutil.copyfileobj(response, out)
    except OSError as error:  # URLError, HTTPError and timeouts are OSErrors
        reason = str(getattr(error, "reason", None) or error).splitlines()[0]
        raise ValueError(
            f"cannot download HellaSwag from {HELLASWAG_URL} ({reason}): on a machine with "
            f"internet save that file as {target}, or pass path=<hellaswag_val.jsonl>"
        ) from None
    return target


def load_hellaswag(
    path: str | os.PathLike | None = None, limit: int | None = None
) -> list[ChoiceItem]:
    """The first limit items (None = all) of hellaswag_val.jsonl (None = download it once)."""
    file = hellaswag_file() if path is None else Path(path)
    fields = ("ctx", "ctx_a", "ctx_b", "activity_label")
    items = []
    for doc in _read_items(file, fields, limit):
        query = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        choices = tuple(hellaswag_preprocess(ending) for ending in doc["endings"])
        items.append(
            ChoiceItem(
                doc["ctx"], doc["endings"], doc["label"], hellaswag_preprocess(query), choices
            )
        )
    return items


def load_choice_items(path: str | os.PathLike, limit: int | None = None) -> list[ChoiceItem]:
    """The first limit items (None = all) of a .jsonl file whose lines have ctx, endings, label."""
    return [
        ChoiceItem(doc["ctx"], doc["endings"], doc["label"], doc["ctx"], doc["endings"])
        for doc in _read_items(Path(path), ("ctx",), limit)
    ]


def _read_items(file: Path, texts: tuple[str, ...], limit: int | None) -> Iterator[dict]:
    """The items of a .jsonl file, each checked: the text fields, endings and label; one line
    naming the file and the line number for the first that is wrong."""
    if not file.is_file():
        what = "is not a file" if file.exists() else "does not exist"
        raise ValueError(f"path={str(file)!r} {what}: give a .jsonl file, one item a line")
    count = 0
    with open(file, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            if limit is not None and count == limit:
                return
            if not raw.strip():
                continue
            try:
                doc = _check_item(raw, texts)
            except ValueError as error:
                raise ValueError(f"{file} line {number}: {error}") from None
            count += 1
            yield doc
    if count == 0:
        raise ValueError(f"{file} holds no items: one JSON object a line")


def _check_item(raw: bytes, texts: tuple[str, ...]) -> dict:
    """One line's item (endings a tuple, label an int), or a ValueError saying what is wrong."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(doc, dict):
        raise ValueError(
            f"a JSON {type(doc).__name__}, not an object with {', '.join(texts)}, endings and label"
        )
    for key in (*texts, "endings", "label"):
        if key not in doc:
            raise ValueError(f"no {key!r} field (an item has {', '.join(texts)}, endings, label)")
    for key in texts:
        if not isinstance(doc[key], str):
            raise ValueError(f"{key!r} is {doc[key]!r}, not text")
    endings = doc["endings"]
    if (
        not isinstance(endings, list)
        or len(endings) < 2
        or not all(isinstance(e, str) for e in endings)
    ):
        raise ValueError(f"'endings' is {endings!r}: must be a list of at least 2 texts")
    label = doc["label"]
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy writes "3"
        label = int(label)
    if not is_integer(label) or not 0 <= label < len(endings):
        raise ValueError(
            f"'label' is {doc['label']!r}: must be the index of the right ending, 0 to "
            f"{len(endings) - 1}"
        )
    return {**doc, "endings": tuple(endings), "label": int(label)}


# ---------------------------------------------------------------------------------------------
# Multiple choice: the scoring


@dataclass(frozen=True)
class ItemScore:
    """One item's log-likelihood of each ending, and whether acc and acc_norm chose its label."""

    logprobs: tuple[float, ...]
    correct: bool
    correct_norm: bool


Encoded = tuple[list[int], list[list[int]], list[int]]  # an item's context, candidates, lengths


def _encode(item: ChoiceItem, style: str, context_length: int) -> Encoded:
    """The context's ids, each candidate's, and what acc_norm divides each candidate's
    log-likelihood by, as style has them; every candidate follows the same context."""
    enc = get_tokenizer()

    def encode(text: str) -> list[int]:
        return enc.encode(text, allowed_special="all")  # as transformers' tokenizer does

    if style == "completion":
        context = encode(item.context)
        candidates = [encode(DELIMITER + ending) for ending in item.endings]
        lengths = [len(candidate) for candidate in candidates]
    else:  # harness: HFLM's _encode_pair, whose context ids are the same for every choice
        query, moved = item.query.rstrip(), item.query[len(item.query.rstrip()) :]
        context = encode(query)  # the query's trailing whitespace moves into each continuation
        candidates = [encode(query + moved + DELIMITER + c)[len(context) :] for c in item.choices]
        lengths = [len(choice) for choice in item.choices]
    for k, candidate in enumerate(candidates):
        if len(candidate) > context_length:
            raise ValueError(
                f"ending {k} of the item {item.context[:40]!r}... has {len(candidate)} tokens, "
                f"more than the model's context_length={context_length}"
            )
    # An empty context: the candidates follow <|endoftext|>, as the harness conditions them.
    return context or [enc.eot_token], candidates, lengths


def _fits_whole(encoded: Encoded, context_length: int) -> bool:
    """Whether the model reads the whole context before every candidate (and none is empty)."""
    context, candidates, _ = encoded
    sizes = [len(candidate) for candidate in candidates]
    return min(sizes) >= 1 and len(context) + max(sizes) - 1 <= context_length


def _context_batches(
    encoded: Sequence[Encoded], indices: list[int], batch_size: int, context_length: int
) -> Iterator[list[int]]:
    """The indices in batches of at most batch_size, longest context first (little padding, as
    the harness sorts its requests), each batch's widest context and longest candidate fitting
    the model's context together."""
    batch: list[int] = []
    width = tail = 0
    for i in sorted(indices, key=lambda i: -len(encoded[i][0])):
        context, candidates, _ = encoded[i]
        longest = max(len(candidate) for candidate in candidates) - 1
        if batch and (len(batch) == batch_size or width + max(tail, longest) > context_length):
            yield batch
            batch = []
        if not batch:
            width, tail = len(context), 0
        batch.append(i)
        tail = max(tail, longest)
    if batch:
        yield batch


def _score_shared(model: GPT, group: Sequence[Encoded]) -> list[list[float]]:
    """Each candidate's log-likelihood, the items' contexts run once (left-padded into one
    batch), then every candidate of every item in one batch after its context's keys and values
    (the KV cache, each item's row repeated for each of its candidates)."""
    device, dtype = _device_of(model), next(model.parameters()).dtype
    width = max(len(context) for context, _, _ in group)
    candidates = [candidate for _, item_candidates, _ in group for candidate in item_candidates]
    tail = max(len(candidate) for candidate in candidates) - 1  # the last token is no input
    contexts = torch.zeros(len(group), width, dtype=torch.long)
    real = torch.zeros(len(group), width + tail, dtype=torch.long)  # the attention mask
    for row, (context, _, _) in enumerate(group):
        contexts[row, width - len(context) :] = torch.tensor(context)
        real[row, width - len(context) : width] = 1
    cache = KVCache(model.cfg, len(group), width + tail, device, dtype)
    # The last context position's logits score each candidate's first token.
    first = model(contexts.to(device), cache, real[:, :width].to(device), last_only=True)
    item_of = [row for row, (_, item_candidates, _) in enumerate(group) for _ in item_candidates]
    index = torch.tensor(item_of, device=device)
    heads = torch.tensor([candidate[0] for candidate in candidates], device=device)
    sums = first[:, 0].float().log_softmax(-1)[index, heads].double()  # (candidates,)
    if tail:
        inputs = torch.zeros(len(candidates), tail, dtype=torch.long)  # right-padded
        mask = real[item_of]
        row_of, position, target = [], [], []
        for row, candidate in enumerate(candidates):
            inputs[row, : len(candidate) - 1] = torch.tensor(candidate[:-1], dtype=torch.long)
            mask[row, width : width + len(candidate) - 1] = 1
            row_of += [row] * (len(candidate) - 1)
            position += range(len(candidate) - 1)
            target += candidate[1:]
        cache.keys, cache.values = cache.keys[:, index], cache.values[:, index]
        logits = model(inputs.to(device), cache, mask.to(device))  # (candidates, tail, vocab)
        row_of, position, target = (
            torch.tensor(v, device=device) for v in (row_of, position, target)
        )
        picked = logits[row_of, position].float()
        logprob = picked.log_softmax(-1).gather(1, target[:, None]).squeeze(1)
        sums.index_add_(0, row_of, logprob.double())
    return _per_item(sums.tolist(), group)


def _score_rows(model: GPT, group: Sequence[Encoded]) -> list[list[float]]:
    """Each candidate's log-likelihood, one row of context + candidate each, cut as the harness
    cuts a row longer than the model's context: its last context_length + 1 tokens (the model
    reads all but the last), so the context's first tokens are lost, never the candidate's."""
    device, context_length = _device_of(model), model.cfg.context_length
    rows = [
        ((context + candidate)[-(context_length + 1) :][:-1], candidate)
        for context, candidates, _ in group
        for candidate in candidates
    ]
    width = max(len(tokens) for tokens, _ in rows)
    inputs = torch.zeros(len(rows), width, dtype=torch.long)  # right-padded: causal
    row_of, position, target = [], [], []  # attention leaves the real tokens alone
    for row, (tokens, candidate) in enumerate(rows):
        inputs[row, : len(tokens)] = torch.tensor(tokens)
        row_of += [row] * len(candidate)
        position += range(len(tokens) - len(candidate), len(tokens))
        target += candidate
    logits = model(inputs.to(device))  # (rows, T, vocab_size)
    row_of, position, target = (torch.tensor(v, device=device) for v in (row_of, position, target))
    picked = logits[row_of, position].float()
    logprob = picked.log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
    return _per_item(sums.index_add_(0, row_of, logprob.double()).tolist(), group)


def _per_item(sums: list[float], group: Sequence[Encoded]) -> list[list[float]]:
    """The candidates' flat list of sums, cut into one list per item."""
    found = []
    for _, candidates, _ in group:
        found.append(sums[: len(candidates)])
        sums = sums[len(candidates) :]
    return found


def score_items(
    model: GPT,
    items: Sequence[ChoiceItem],
    style: str,
    batch_size: int = 8,
    progress: bool = False,
) -> list[ItemScore]:
    """Each item's endings scored in style ("completion" or "harness"), batch_size items (with
    all their endings) a batch: the contexts once, then the endings after them, from the KV
    cache; an item whose context must be cut to fit a candidate, one full row per ending."""
    if style not in STYLES:
        raise ValueError(f"style={style!r} is unknown: use {' or '.join(STYLES)}")
    context_length = model.cfg.context_length
    encoded = [_encode(item, style, context_length) for item in items]
    fits = [_fits_whole(e, context_length) for e in encoded]
    whole = [i for i, fit in enumerate(fits) if fit]
    cut = [i for i, fit in enumerate(fits) if not fit]
    batches = [
        (_score_shared, b) for b in _context_batches(encoded, whole, batch_size, context_length)
    ]
    batches += [(_score_rows, cut[k : k + batch_size]) for k in range(0, len(cut), batch_size)]
    lls: list[list[float]] = [[] for _ in items]
    bar = tqdm(total=len(items), desc=f"{style} style", unit="item", disable=_bar(progress))
    with bar, _evaluating(model):
        for score, batch in batches:
            for i, found in zip(batch, score(model, [encoded[i] for i in batch]), strict=True):
                lls[i] = found
            bar.update(len(batch))
    scores = []
    for item, found, (_, _, lengths) in zip(items, lls, encoded, strict=True):
        logprobs = np.array(found)
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: -inf
            pred_norm = int(np.argmax(logprobs / np.array(lengths, dtype=np.float64)))
        correct = int(np.argmax(logprobs)) == item.label
        scores.append(ItemScore(tuple(logprobs.tolist()), correct, pred_norm == item.label))
    return scores


def score_choices(
    model: GPT,
    items: Sequence[ChoiceItem],
    style: str,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """acc, acc_norm and the number of items; under torch.distributed each rank scores its share
    (rank_split) and the counts are summed across ranks."""
    scores = score_items(model, rank_split(items), style, batch_size, progress)
    correct = sum(s.correct for s in scores)
    correct_norm = sum(s.correct_norm for s in scores)
    correct, correct_norm, count = _sum_across_ranks(
        [correct, correct_norm, len(scores)], _device_of(model)
    )
    if count == 0:
        raise ValueError("no items to score")
    return {"acc": correct / count, "acc_norm": correct_norm / count, "items": int(count)}


# ---------------------------------------------------------------------------------------------
# Shared by both


def rank_split(items: Sequence[T]) -> Sequence[T]:
    """This rank's share, items[rank::world_size], under torch.distributed; else all of them."""
    if dist.is_available() and dist.is_initialized():
        return items[dist.get_rank() :: dist.get_world_size()]
    return items


def _sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def _device_of(model: GPT) -> torch.device:
    return next(model.parameters()).device


def _bar(progress: bool) -> bool | None:
    """tqdm's disable: None shows a bar only where stderr is a terminal; rank 0's alone."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return None if progress and rank == 0 else True


@contextmanager
def _evaluating(model: GPT) -> Iterator[None]:
    """Eval mode and no autograd for the block; the mode it had after (a training callback's)."""
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(training)


# ---------------------------------------------------------------------------------------------
# The command line


def _record(task: str, metric: str, style: str | None, value: float, items: int) -> dict:
    value = value if math.isfinite(value) else None  # JSON has no inf or nan
    return {"task": task, "metric": metric, "style": style, "value": value, "items": items}


def _print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'task':<16} {'style':<11} {'metric':<9} {'value':>10} {'items':>12}")
    for r in results:
        value = "nan" if r["value"] is None else f"{r['value']:.4f}"
        style = r["style"] or "-"
        print(f"{r['task']:<16} {style:<11} {r['metric']:<9} {value:>10} {r['items']:>12,}")


def _write_results(out: Path, model: str, results: list[dict[str, Any]]) -> None:
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, "w") as f:
        json.dump({"model": model, "date": date, "results": results}, f, indent=2)
        f.write("\n")


def _run(cfg: DictConfig) -> None:
    # Cheap arguments, then the data, then the model: a typo fails before the weights load.
    task = cfg.task
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown: use {', '.join(TASKS)}")
    check_integer("limit", cfg.limit, 1, none=True)
    check_integer("batch_size", cfg.batch_size, 1)
    if cfg.stride is not None:
        check_integer("stride", cfg.stride, 1)
    out = Path(str(cfg.out))
    if not str(cfg.out).strip() or out.is_dir():
        raise ValueError(
            f"out={cfg.out!r} is not a file name: name the results file, e.g. out=results.json"
        )
    device = torch_device(str(cfg.device))
    path = None if cfg.path is None else str(cfg.path)
    if task == "perplexity":
        try:
            ids = corpus_tokens(path)
        except ValueError as error:  # tokens.py names the training key
            raise ValueError(str(error).replace("data.path=", "path=", 1)) from None
        ids = ids[: cfg.limit]
    elif task == "hellaswag":
        items = load_hellaswag(path, cfg.limit)
    elif path is None:
        raise ValueError("task=multiple_choice needs path=<a .jsonl file with ctx, endings, label>")
    else:
        items = load_choice_items(path, cfg.limit)
    model = load_weights(str(cfg.checkpoint), key="checkpoint").to(device)
    if model.cfg.vocab_size < VOCAB_SIZE:
        raise ValueError(
            f"checkpoint={cfg.checkpoint!r} has vocab_size={model.cfg.vocab_size}: evaluation "
            f"reads text with GPT-2's tokenizer, whose ids go up to {VOCAB_SIZE - 1}"
        )
    if task == "perplexity":
        found = perplexity(model, ids, cfg.stride, cfg.batch_size, progress=True)
        results = [
            _record(task, "loss", None, found["loss"], found["tokens"]),
            _record(task, "ppl", None, found["ppl"], found["tokens"]),
            _record(task, "bpb", None, found["bpb"], found["bytes"]),
        ]
    else:
        results = []
        for style in STYLES:
            found = score_choices(model, items, style, cfg.batch_size, progress=True)
            for metric in ("acc", "acc_norm"):
                results.append(_record(task, metric, style, found[metric], found["items"]))
    _print_table(results)
    _write_results(out, str(cfg.checkpoint), results)
    print(f"results written to {out}")


@hydra.main(version_base=None, config_path=str(CONF), config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    """`python -m gpt2_lightning.evaluate checkpoint=... task=...`: a table and results.json."""
    _run(cfg)


def run() -> None:
    """The command, its line checked before Hydra starts."""
    check_command_line("evaluate", sys.argv[1:])
    main()


if __name__ == "__main__":
    run()
