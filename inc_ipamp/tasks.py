"""Accuracy tasks on shipped text, run through lm-evaluation-harness with no hub access.

No package ships hellaswag / piqa / lambada data and the hubs are unreachable, so the tasks are built
deterministically from gensim's test corpora, from the *evaluation* split only (``data.split_documents``),
and any item whose text also occurs in a calibration document is dropped (the Lee corpus repeats a few
articles across the parity split):

- ``lee_next_sentence``: 4-way multiple choice. Context = the first two sentences of a Lee news article;
  choices = its third sentence and three length-matched sentences from other evaluation articles.
  Metrics acc (sum log-likelihood) and acc_norm (per byte), chance 0.25.
- ``wiki_last_word``: LAMBADA-style. Context = ~100 words of a Wikipedia evaluation article ending just
  before a sentence-final word that already occurred in the context; target = that word. Metrics acc (the
  whole word is the greedy continuation) and perplexity of the target word.

The items are written as JSON lines plus a task YAML (``dataset_path: json`` + ``data_files``) under a
content-hashed folder, so the same task also runs from the lm-eval CLI (``--include_path``). A plan is
applied with ``apply.fake.fake_quant`` around the whole lm-eval run; the LM wrapper scores one request per
forward (batch 1), so the per-call activation scales of the fake-quantiser never mix requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .apply import Applier
from .data import lee_documents, split_documents, wiki_documents
from .errors import IpampError

log = logging.getLogger(__name__)

#: Bump when the item construction changes (it is part of the cache folder's hash).
TASK_VERSION = "1"
N_CHOICES = 4
_SENT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREV = re.compile(r"(?:\b(?:[A-Z]\.)+|\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Lt|Gen|Col|Sen|Rep|Gov|Prof|No|Mt|vs|Inc|Co|"
                     r"Corp|Ltd|Jan|Feb|Aug|Sept|Sep|Oct|Nov|Dec)\.)$")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


class TaskError(IpampError):
    """An accuracy task could not be built or run (unknown name, lm-eval missing, empty task)."""


# --------------------------------------------------------------------------------------------------
# Item construction (pure Python, deterministic)
# --------------------------------------------------------------------------------------------------
def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: a split is an end mark, optional closing quote, whitespace, then a
    capital or digit, except after an abbreviation ("U.S.", "Mr.", "J.")."""
    spans, start = [], 0
    for m in _SENT.finditer(text):
        head = text[start: m.start()]
        if _ABBREV.search(head):
            continue
        end = start + len(head.rstrip()) + len(m.group().rstrip())
        spans.append((start, end))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (see ``sentence_spans``)."""
    return [text[a:b] for a, b in sentence_spans(text)]


def _calibration_text(docs: tuple[str, ...]) -> str:
    return "\n".join(split_documents(docs, "calibration"))


def lee_next_sentence_items(seed: int = 0) -> list[dict[str, Any]]:
    """4-way next-sentence items from the Lee evaluation split (see the module docstring)."""
    docs = lee_documents()
    calib = _calibration_text(docs)
    arts = []
    for i, doc in enumerate(split_documents(docs, "evaluation")):
        spans = sentence_spans(doc)
        s = [doc[a:b] for a, b in spans]
        if len(s) < 3 or any(len(x) < 25 for x in s[:3]) or doc in calib or any(x in calib for x in s):
            continue
        arts.append((i, doc[: spans[1][1]], s))
    # Distractor pool: non-leading sentences of every usable evaluation article, tagged with their article.
    pool = [(i, x) for i, _, s in arts for x in s[1:] if len(x) >= 25]
    items = []
    for i, context, s in arts:
        answer = s[2]
        rng = random.Random(f"lee_next_sentence:{seed}:{i}")
        near = [x for j, x in pool if j != i and 0.6 * len(answer) <= len(x) <= 1.6 * len(answer) and x != answer]
        if len(near) < N_CHOICES - 1:
            near = [x for j, x in pool if j != i and x != answer]
        distractors = rng.sample(sorted(set(near)), N_CHOICES - 1)
        label = rng.randrange(N_CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"id": f"lee-eval-{i}", "context": context, "choices": choices, "label": label})
    return items


def wiki_last_word_items(seed: int = 0, context_words: int = 100, per_doc: int = 4,
                         min_len: int = 4) -> list[dict[str, Any]]:
    """LAMBADA-style last-word items from the Wikipedia evaluation split (see the module docstring).

    A target is a sentence-final word of ≥ ``min_len`` letters that also occurs (case-insensitively) in its
    ``context_words``-word context, so it is predictable from the passage; per article at most ``per_doc``
    targets, ≥ ``context_words`` words apart, chosen with a seeded RNG.
    """
    docs = wiki_documents()
    calib = _calibration_text(docs)
    items = []
    for i, doc in enumerate(split_documents(docs, "evaluation")):
        words = list(_WORD.finditer(doc))
        cands = []
        for k in range(context_words, len(words)):
            w = words[k]
            after = doc[w.end(): w.end() + 1]
            if after not in (".", "!", "?") or len(w.group()) < min_len or not w.group().isalpha():
                continue
            ctx_words = {x.group().lower() for x in words[k - context_words: k]}
            if w.group().lower() in ctx_words:
                cands.append(k)
        rng = random.Random(f"wiki_last_word:{seed}:{i}")
        rng.shuffle(cands)
        chosen: list[int] = []
        for k in cands:
            if len(chosen) >= per_doc:
                break
            if all(abs(k - c) >= context_words for c in chosen):
                chosen.append(k)
        for k in sorted(chosen):
            start, w = words[k - context_words].start(), words[k]
            context = re.sub(r"\s+", " ", doc[start: w.start()]).strip()
            if (context[-60:] + " " + w.group()) in calib or context[-200:] in calib:
                continue
            items.append({"id": f"wiki-eval-{i}-{k}", "context": context, "target": w.group()})
    return items


#: name -> (item builder, lm-eval config fields, short description)
TASKS: dict[str, tuple[Callable[[int], list[dict[str, Any]]], dict[str, Any], str]] = {
    "lee_next_sentence": (
        lee_next_sentence_items,
        {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "choices",
         "doc_to_target": "label", "target_delimiter": " ",
         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                         {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
        "4-way next-sentence choice on gensim's Lee news corpus (evaluation split), chance 0.25",
    ),
    "wiki_last_word": (
        wiki_last_word_items,
        {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{' ' + target}}",
         "target_delimiter": "",
         "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                         {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        "LAMBADA-style last word of ~100-word passages of gensim's Wikipedia sample (evaluation split)",
    ),
}


def build_items(task: str, seed: int = 0) -> list[dict[str, Any]]:
    """The items of ``task`` (deterministic for a given seed)."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    items = TASKS[task][0](seed)
    if not items:
        raise TaskError(f"task {task} has no items (is gensim's test data complete?)")
    return items


def _cache_root() -> Path:
    return Path(os.environ.get("INC_IPAMP_CACHE", Path.home() / ".cache" / "inc_ipamp")) / "tasks"


def task_config(task: str, data_file: str | Path) -> dict[str, Any]:
    """The lm-eval task config of ``task`` reading its items from ``data_file`` (JSON lines)."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "num_fewshot": 0, **TASKS[task][1],
            "metadata": {"version": float(TASK_VERSION), "description": TASKS[task][2]}}


def write_task(task: str, seed: int = 0, root: str | Path | None = None) -> Path:
    """Write ``task``'s items and YAML into a folder named by their content hash; return the folder.

    The folder is an lm-eval ``include_path``; rewriting is skipped when the same content is already there.
    """
    import yaml

    items = build_items(task, seed)
    body = "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items)
    digest = hashlib.sha256(f"{TASK_VERSION}\n{task}\n{body}".encode()).hexdigest()[:16]
    folder = Path(root) if root is not None else _cache_root() / f"{task}-s{seed}-{digest}"
    data = folder / f"{task}.jsonl"
    yml = folder / f"{task}.yaml"
    if data.exists() and yml.exists() and data.read_text(encoding="utf-8") == body:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = data.with_suffix(".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(data)
    yml.write_text(yaml.safe_dump(task_config(task, data.resolve()), sort_keys=False), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------------
# The lm-eval model wrapper
# --------------------------------------------------------------------------------------------------
def _lm_eval():
    """Import lm-eval offline (datasets/hub must never try the network)."""
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise TaskError("accuracy tasks need lm-eval (pip install 'inc-ipamp[eval]' or pip install lm-eval)") from None
    return lm_eval, TemplateLM


@torch.no_grad()
def continuation_logprob(model: nn.Module, context_ids: list[int], continuation_ids: list[int],
                         max_length: int | None = None) -> tuple[float, bool]:
    """(Σ log p(continuation | context), whether every continuation token is the argmax), one forward."""
    ids = (list(context_ids) + list(continuation_ids))
    if max_length is not None and len(ids) > max_length + 1:
        ids = ids[-(max_length + 1):]
    inp = torch.tensor([ids[:-1]], device=next(model.parameters()).device)
    logits = model(inp, use_cache=False).logits[0, -len(continuation_ids):].double()
    logp = torch.log_softmax(logits, dim=-1)
    tgt = torch.tensor(continuation_ids, device=logp.device)
    lp = float(logp.gather(1, tgt[:, None]).sum())
    greedy = bool((logits.argmax(-1) == tgt).all())
    return lp, greedy


def make_lm(model: nn.Module, tokenizer, max_length: int = 2048, progress: bool = False):
    """An ``lm_eval.api.model.TemplateLM`` over an already-loaded causal LM (loglikelihood requests only)."""
    _, TemplateLM = _lm_eval()

    class IpampLM(TemplateLM):
        """Scores each (context, continuation) with one batch-1 forward of ``model`` as it is (fake-quant hooks
        installed by the caller stay active)."""

        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

        @property
        def eot_token_id(self) -> int:
            eos = self.tokenizer.eos_token_id
            return int(eos if eos is not None else 0)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            from tqdm.auto import tqdm

            out = []
            for _, ctx, cont in tqdm(requests, desc="loglikelihood", disable=disable_tqdm or not progress,
                                     leave=False):
                out.append(continuation_logprob(self.model, ctx, cont, self.max_length))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            raise TaskError("loglikelihood_rolling is not used by the inc-ipamp tasks")

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            raise TaskError("generation is not supported by the inc-ipamp LM wrapper (loglikelihood tasks only)")

    return IpampLM()


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old, strict=True):
            lg.setLevel(lv)


def accuracy(model: nn.Module, tokenizer, assignment: dict[str, str] | None = None,
             task: str = "lee_next_sentence", limit: int | None = None, seed: int = 0,
             progress: bool = False,
             apply: Applier | None = None) -> dict[str, Any]:
    """Accuracy (and stderr) of ``model`` on ``task`` through lm-eval, with ``assignment`` applied.

    ``apply`` puts the assignment on the model for the whole run: ``apply.fake.fake_quant`` by default (the
    noise the sensitivity model predicts); ``get_backend("cpu").apply`` scores with the real kernels instead.
    ``limit`` takes the first N items (the item order is fixed). Returns the task's metrics as plain keys
    (``acc``, ``acc_stderr``, ``acc_norm``…, ``perplexity``), plus ``n``, ``chance``, ``wall_s`` and what ran.
    """
    from .apply.fake import fake_quant
    from .formats import get_format

    lm_eval, _ = _lm_eval()
    from lm_eval.tasks import TaskManager

    folder = write_task(task, seed)
    lm = make_lm(model, tokenizer, progress=progress)
    t0 = time.perf_counter()
    ctx = (apply or fake_quant)(model, assignment) if assignment else contextlib.nullcontext()
    with _quiet(), ctx:
        tm = TaskManager(include_path=str(folder), include_defaults=False)
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit, bootstrap_iters=1000,
                                      log_samples=False, random_seed=None, numpy_random_seed=None,
                                      torch_random_seed=None, fewshot_random_seed=None)
    if res is None or task not in res.get("results", {}):
        raise TaskError(f"lm-eval returned no results for {task}")
    raw = res["results"][task]
    out: dict[str, Any] = {"task": task, "seed": seed}
    for key, val in raw.items():
        if "," not in key:
            continue
        name, _filter = key.split(",", 1)
        out[name] = None if isinstance(val, str) else float(val)
    n = res.get("n-samples", {}).get(task, {})
    out["n"] = int(n.get("effective", limit or 0))
    out["chance"] = 1.0 / N_CHOICES if TASKS[task][1]["output_type"] == "multiple_choice" else None
    out["n_low_precision_ops"] = sum(1 for f in (assignment or {}).values() if get_format(f).kind != "ref")
    out["wall_s"] = time.perf_counter() - t0
    out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    out["data"] = str(folder)
    for k in ("acc", "acc_norm"):
        if out.get(k) is not None and out.get(f"{k}_stderr") is None and out["n"]:
            out[f"{k}_stderr"] = math.sqrt(out[k] * (1 - out[k]) / max(out["n"] - 1, 1))
    return out
