"""
The CORE metric of the DCLM paper (Li et al. 2024, arXiv:2406.11794), scored the way upstream
nanochat scores it, so our numbers compare with its leaderboard (GPT-2 1.5B: 0.2565).

The eval bundle (`python -m scripts.base_eval --download-bundle` unpacks it to <base>/eval_bundle):
  core.yaml            icl_tasks: [{label, dataset_uri, icl_task_type, num_fewshot: [k], continuation_delimiter}]
                       (the delimiter defaults to " "; other keys are ignored)
  eval_meta_data.csv   one row per task: "Eval Task" (the label) and "Random baseline" (chance accuracy, percent)
  eval_data/<uri>      the task's examples, one JSON object a line:
                         multiple_choice    {"query": str, "choices": [str], "gold": int}
                         schema             {"context_options": [str], "continuation": str, "gold": int}
                         language_modeling  {"context": str, "continuation": str}

Scoring one example. Each candidate is a whole prompt: k few-shot examples of the same task, each
completed with its gold answer and followed by a blank line, then the example itself.
  multiple_choice    one prompt per choice (same context): the choice whose tokens have the lowest
                     mean loss wins.
  schema             one prompt per context option (same continuation): the option under which the
                     continuation's tokens have the lowest mean loss wins.
  language_modeling  correct iff greedy decoding (argmax at every position) reproduces every token
                     of the continuation.
Per task: accuracy, centered = (acc - b) / (1 - b) with b the random baseline as a fraction (chance
scores 0, perfect 1). CORE = the mean centered accuracy over the tasks.

Upstream's numbers also rest on which examples and shots are drawn: each task's examples are shuffled
with random.Random(1337) before --max-per-task keeps the first N, and example i takes its k shots
from the kept examples (i excluded) with random.Random(1234 + i).sample. We draw the same way.
"""

import csv
import json
import os
import pathlib
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import yaml
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import UserError, get_base_dir, print0

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # upstream nanochat's copy
GPT2_CORE = 0.256525  # GPT-2 1.5B as upstream measures it: the "GPT-2 grade" bar
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FETCH_HINT = "run `python -m scripts.base_eval --download-bundle`"


def default_bundle_dir():
    return os.path.join(get_base_dir(), "eval_bundle")


@dataclass
class Task:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str      # between a query/context and its answer
    baseline: float     # accuracy of random guessing, in percent (eval_meta_data.csv)
    examples: list      # dicts as in the JSONL, shuffled and cut to max_per_task


# -----------------------------------------------------------------------------
# The bundle

def load_tasks(bundle_dir=None, max_per_task=-1):
    """The tasks of <bundle_dir>/core.yaml with their examples and random baselines.
    A missing bundle or file is a UserError that says how to get it."""
    bundle_dir = bundle_dir or default_bundle_dir()
    config_path = os.path.join(bundle_dir, "core.yaml")
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    for path in (config_path, meta_path):
        if not os.path.isfile(path):
            raise UserError(f"no CORE eval bundle in {bundle_dir} (missing {os.path.basename(path)}): {FETCH_HINT}")
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    with open(meta_path, encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for entry in config["icl_tasks"]:
        label, task_type = entry["label"], entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise UserError(f"{config_path}: task {label} has type {task_type!r}; CORE scores {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise UserError(f"{meta_path} has no random baseline for task {label}: {FETCH_HINT} again")
        data_path = os.path.join(bundle_dir, "eval_data", entry["dataset_uri"])
        if not os.path.isfile(data_path):
            raise UserError(f"no data for CORE task {label} ({data_path} is missing): {FETCH_HINT} again")
        with open(data_path, encoding="utf-8") as f:
            examples = [json.loads(line) for line in f if line.strip()]
        random.Random(1337).shuffle(examples)
        if max_per_task > 0:
            examples = examples[:max_per_task]
        shots = entry.get("num_fewshot", [0])
        tasks.append(Task(label, task_type, shots[0] if isinstance(shots, list) else int(shots),
                          entry.get("continuation_delimiter", " "), baselines[label], examples))
    return tasks


def download_bundle(bundle_dir=None, url=BUNDLE_URL, log=print0):
    """Fetch the eval bundle zip and unpack it to bundle_dir (default <base>/eval_bundle); a bundle
    already there is kept. url may be a file:// URL or a plain path (a zip copied from a machine with network)."""
    bundle_dir = os.path.abspath(bundle_dir or default_bundle_dir())
    if os.path.isfile(url):
        url = pathlib.Path(url).absolute().as_uri()
    elif not urllib.parse.urlparse(url).scheme:
        raise UserError(f"--bundle-url {url} is neither a file nor a URL: give the path of eval_bundle.zip, "
                        f"a file:// URL or an https:// URL")
    if os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        log(f"eval bundle already at {bundle_dir}")
        return bundle_dir
    parent = os.path.dirname(bundle_dir)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".eval_bundle_") as tmp:
        zip_path = os.path.join(tmp, "eval_bundle.zip")
        log(f"downloading {url}")
        try:
            with urllib.request.urlopen(url) as response, open(zip_path, "wb") as f:
                shutil.copyfileobj(response, f)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"could not download the eval bundle from {url} ({getattr(e, 'reason', e)}): check the "
                            f"network, or copy eval_bundle.zip here and pass --bundle-url file:///path/to/eval_bundle.zip")
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(os.path.join(tmp, "unpacked"))
        except zipfile.BadZipFile:
            raise UserError(f"{url} is not a zip file: check --bundle-url")
        unpacked = os.path.join(tmp, "unpacked")
        src = os.path.join(unpacked, "eval_bundle") if os.path.isdir(os.path.join(unpacked, "eval_bundle")) else unpacked
        if not os.path.isfile(os.path.join(src, "core.yaml")):
            raise UserError(f"{url} holds no core.yaml (neither at its top nor under eval_bundle/): not the CORE eval bundle")
        if os.path.isdir(bundle_dir):
            shutil.rmtree(bundle_dir)  # an incomplete earlier copy (it had no core.yaml)
        os.replace(src, bundle_dir)  # same filesystem: the bundle appears whole or not at all
    log(f"eval bundle placed at {bundle_dir}")
    return bundle_dir


def centered(accuracy, baseline_percent):
    """Accuracy rescaled so random guessing scores 0 and a perfect score 1."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)

# -----------------------------------------------------------------------------
# Prompts and the tokens they score

def fewshot_examples(examples, idx, k):
    """The k shots of example idx: random.Random(1234 + idx).sample of the other examples. sample()
    draws positions in the population, so positions in range(n - 1), shifted past idx, are the same
    draws as sampling the list of other indices, without building that list per example."""
    n = len(examples) - 1
    if k <= 0 or n <= 0:
        return []
    return [examples[j + (j >= idx)] for j in random.Random(1234 + idx).sample(range(n), min(k, n))]


def render_prompts(task_type, item, shots, delimiter):
    """The prompts scored for one example: one per choice (multiple_choice), one per context option
    (schema), or for language_modeling [context alone, context + continuation]."""
    if task_type == "multiple_choice":
        prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in shots)
        return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    if task_type == "language_modeling":
        # Contexts are stripped (some carry trailing whitespace), and so is the context-only prompt:
        # a delimiter's trailing space would be a token of its own there, while in the full prompt it
        # merges into the continuation's first token, and the context-only tokens must be a prefix.
        prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in shots)
        prompt = f"{prefix}{item['context'].strip()}{delimiter}"
        return [prompt.strip(), prompt + item["continuation"]]
    raise ValueError(f"unknown CORE task type {task_type!r}")


def _common_prefix_len(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def score_spans(task_type, seqs):
    """(rows, spans): the token rows to score and each row's continuation tokens row[start:end].
    seqs: the BOS-prefixed tokens of render_prompts' output. Every span holds at least one token
    and starts at 1 or later (the token before it is what predicts the first one)."""
    if task_type == "multiple_choice":  # same context, the choices start where the rows first differ
        start = _common_prefix_len(seqs)
        return seqs, [(min(start, len(s) - 1), len(s)) for s in seqs]
    if task_type == "schema":  # contexts differ, the continuation is the common suffix
        n = _common_prefix_len([s[::-1] for s in seqs])
        return seqs, [(max(len(s) - n, 1), len(s)) for s in seqs]
    # language_modeling: the context-only tokens are a prefix of the full prompt's (unless the
    # tokenizer merged across the boundary: then the continuation starts where they part)
    without, full = seqs
    return [full], [(min(_common_prefix_len([without, full]), len(full) - 1), len(full))]


def crop(row, start, end, max_len):
    """Keep the last max_len tokens (the model's position limit), the span shifted with them."""
    cut = len(row) - max_len
    if cut <= 0:
        return row, start, end
    return row[cut:], max(start - cut, 1), end - cut

# -----------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_rows(model, rows, spans, device):
    """One forward over a right-padded batch. Returns, per row, the mean loss (nats) over its span
    and whether greedy decoding reproduces the span. model(x) must return logits (B, T, vocab)."""
    B, T = len(rows), max(len(r) for r in rows)
    x = torch.zeros(B, T, dtype=torch.long)  # padding sits after each row: causal attention never mixes it in
    y = torch.full((B, T), -1, dtype=torch.long)  # y[i, j] = row[j + 1] where that token is in the span, else -1
    for i, (row, (start, end)) in enumerate(zip(rows, spans)):
        x[i, :len(row)] = torch.from_numpy(row)
        y[i, start - 1:end - 1] = x[i, start:end]
    x, y = x.to(device), y.to(device)
    logits = model(x)
    losses = F.cross_entropy(logits.reshape(B * T, -1).float(), y.view(-1), ignore_index=-1, reduction="none").view(B, T)
    mean_loss = losses.sum(1) / (y >= 0).sum(1)
    greedy = ((logits.argmax(-1) == y) | (y < 0)).all(1)
    return mean_loss.tolist(), greedy.tolist()


@dataclass
class _Example:
    task: int      # index into the task list
    gold: int      # the right row (multiple_choice, schema); -1 for language_modeling
    rows: list     # int32 numpy arrays, BOS first
    spans: list    # (start, end) per row


def _tokenized_examples(tasks, tokenizer, max_len, chunk=256):
    """Yield every task's examples, tokenized (chunk examples per tokenizer call: all its threads
    busy, and memory bounded for 10k-example tasks)."""
    bos = tokenizer.get_bos_token_id()
    for t, task in enumerate(tasks):
        for lo in range(0, len(task.examples), chunk):
            items = task.examples[lo:lo + chunk]
            prompts = [render_prompts(task.task_type, item, fewshot_examples(task.examples, lo + i, task.num_fewshot),
                                      task.delimiter) for i, item in enumerate(items)]
            flat = tokenizer.encode([p for ps in prompts for p in ps], prepend=bos)
            pos = 0
            for item, ps in zip(items, prompts):
                rows, spans = score_spans(task.task_type, flat[pos:pos + len(ps)])
                pos += len(ps)
                cropped = [crop(r, s, e, max_len) for r, (s, e) in zip(rows, spans)]
                gold = -1 if task.task_type == "language_modeling" else int(item["gold"])
                yield _Example(t, gold, [np.asarray(r, dtype=np.int32) for r, _, _ in cropped],
                               [(s, e) for _, s, e in cropped])


def _batches(examples, max_tokens):
    """Consecutive examples, as many per batch as fit rows x longest row <= max_tokens (at least one)."""
    batch, n_rows, n_len = [], 0, 0  # the batch so far: its examples, rows, longest row
    for ex in examples:
        ex_len = max(len(r) for r in ex.rows)
        if batch and (n_rows + len(ex.rows)) * max(n_len, ex_len) > max_tokens:
            yield batch
            batch, n_rows, n_len = [], 0, 0
        batch.append(ex)
        n_rows, n_len = n_rows + len(ex.rows), max(n_len, ex_len)
    if batch:
        yield batch


class CoreEval:
    """CORE on a fixed set of tasks. The examples are tokenized once here (the trainer evaluates the
    same ones many times) and cut into batches of at most max_tokens tokens (rows x longest row)
    that are the same whatever the number of processes; under torchrun rank r keeps batches
    r, r + world_size, ... and evaluate() sums the counts, so any number of ranks gives the same CORE.
    max_len: the longest row the model takes (longer prompts lose their first tokens)."""

    def __init__(self, tasks, tokenizer, max_len, max_tokens, rank=None, world_size=None):
        self.tasks = tasks
        rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if dist.is_initialized() else 1)
        self.batches = [b for i, b in enumerate(_batches(_tokenized_examples(tasks, tokenizer, max_len), max_tokens))
                        if i % world_size == rank]

    def evaluate(self, model, device):
        """Score every task (all ranks must call this). Run under the caller's autocast and eval mode.
        Returns {"core_metric", "seconds", "tasks": {label: {type, num_fewshot, examples, accuracy,
        baseline, centered}}}."""
        t0 = time.time()
        correct = [0] * len(self.tasks)
        for batch in self.batches:
            rows = [r for ex in batch for r in ex.rows]
            spans = [s for ex in batch for s in ex.spans]
            mean_loss, greedy = score_rows(model, rows, spans, device)
            i = 0
            for ex in batch:
                n = len(ex.rows)
                if ex.gold < 0:
                    ok = greedy[i]
                else:
                    losses = mean_loss[i:i + n]
                    ok = losses.index(min(losses)) == ex.gold  # ties go to the first row
                correct[ex.task] += int(ok)
                i += n
        counts = torch.tensor(correct, dtype=torch.int64, device=device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        results = {}
        for task, count in zip(self.tasks, counts.tolist()):
            acc = count / max(1, len(task.examples))
            results[task.label] = dict(type=task.task_type, num_fewshot=task.num_fewshot, examples=len(task.examples),
                                       accuracy=acc, baseline=task.baseline, centered=centered(acc, task.baseline))
        core = sum(r["centered"] for r in results.values()) / max(1, len(results))
        return dict(core_metric=core, seconds=time.time() - t0, tasks=results)
