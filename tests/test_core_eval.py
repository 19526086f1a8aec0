"""CORE (DCLM) on a tiny bundle of every task type: prompts render as upstream renders them, a model that
prefers the gold answer scores 1, one that always picks the first choice scores the baseline-centred value
worked out by hand, per-row losses and choices match a reference written from the metric's definition on a
tiny GPT, torchrun with 2 processes gives the CORE of one, and scripts.base_eval evaluates real tiny dense,
sparse (masked kernel) and --fp8 (dense on CPU) checkpoints to the numbers the trainer logged for them."""

import csv
import json
import os
import random
import subprocess
import sys
import zipfile

import pytest
import torch

from nanochat import core_eval
from nanochat.common import UserError
from nanochat.core_eval import CoreEval, crop, fewshot_examples, load_tasks, render_prompts, score_spans

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each task's gold indices are chosen so that "always the first choice" has a known accuracy.
MC_FEWSHOT = [  # 4 choices, gold 0 four times in 8: first-choice accuracy 0.5, baseline 25 -> (0.5-0.25)/0.75 = 1/3
    ("Question: What color is a clear daytime sky?", ["blue", "green", "red", "black"], 0),
    ("Question: How many legs does a spider have?", ["eight", "six", "four", "ten"], 0),
    ("Question: Which planet is closest to the sun?", ["Mercury", "Venus", "Earth", "Jupiter"], 0),
    ("Question: What do bees make?", ["honey", "milk", "silk", "glass"], 0),
    ("Question: What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("Question: Which animal says moo?", ["cat", "dog", "cow", "duck"], 2),
    ("Question: What is the opposite of up?", ["left", "right", "over", "down"], 3),
    ("Question: Which one is a fruit?", ["carrot", "apple", "potato", "onion"], 1),
]
MC_ZEROSHOT = [  # 2 choices, gold 0 in 2 of 6: first-choice accuracy 1/3, baseline 50 -> (1/3-1/2)/(1/2) = -1/3
    ("The cat sat on the", ["mat", "moon"], 0),
    ("Water boils when it is", ["cold", "hot"], 1),
    ("At night the sky is", ["bright", "dark"], 1),
    ("Fish live in", ["trees", "water"], 1),
    ("Birds can", ["fly", "read"], 0),
    ("Ice cream is", ["warm", "cold"], 1),
]
SCHEMA = [  # 2 options, gold 0 in 4 of 6: first-option accuracy 2/3, baseline 50 -> 1/3
    (["The trophy did not fit in the case because the trophy", "The trophy did not fit in the case because the case"],
     "was too big.", 0),
    (["Anna gave Beth a gift because Anna", "Anna gave Beth a gift because Beth"], "was generous.", 0),
    (["The dog chased the cat because the dog", "The dog chased the cat because the cat"], "ran away fast.", 1),
    (["Tom thanked Sam because Tom", "Tom thanked Sam because Sam"], "was grateful for the help.", 0),
    (["The ball broke the window because the ball", "The ball broke the window because the window"],
     "was made of thin glass.", 1),
    (["Mia called Zoe because Mia", "Mia called Zoe because Zoe"], "wanted to talk.", 0),
]
LM = [  # greedy exact match; baseline 0. Trailing whitespace in contexts is trimmed by the renderer.
    ("Q: What is two plus two? ", "four"),
    ("Q: What is the capital of France?", "Paris"),
    ("Q: What color is grass?  ", "green"),
    ("Q: How many days are in a week?", "seven"),
    ("Q: What is the opposite of cold?", "hot"),
    ("Q: What animal barks?", "a dog"),
]
FIRST_CHOICE = {"mc_fewshot": 1 / 3, "mc_zeroshot": -1 / 3, "schema_task": 1 / 3, "lm_task": 0.0}
CORE_YAML = """\
# a core.yaml shaped like the DCLM bundle's (extra keys are ignored)
icl_tasks:
- label: mc_fewshot
  dataset_uri: world_knowledge/mc_fewshot.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
  has_categories: true
- label: mc_zeroshot
  dataset_uri: language_understanding/mc_zeroshot.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
- label: schema_task
  dataset_uri: language_understanding/schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
  continuation_delimiter: " "
- label: lm_task
  dataset_uri: world_knowledge/lm.jsonl
  num_fewshot: [2]
  icl_task_type: language_modeling
  continuation_delimiter: "\\nA: "
"""


def write_bundle(bundle_dir):
    data = {
        "world_knowledge/mc_fewshot.jsonl": [dict(query=q, choices=c, gold=g) for q, c, g in MC_FEWSHOT],
        "language_understanding/mc_zeroshot.jsonl": [dict(query=q, choices=c, gold=g) for q, c, g in MC_ZEROSHOT],
        "language_understanding/schema.jsonl": [dict(context_options=o, continuation=c, gold=g) for o, c, g in SCHEMA],
        "world_knowledge/lm.jsonl": [dict(context=q, continuation=a) for q, a in LM],
    }
    for uri, rows in data.items():
        path = os.path.join(bundle_dir, "eval_data", uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(bundle_dir, "core.yaml"), "w") as f:
        f.write(CORE_YAML)
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline", "Centered Metric?"])
        for label, kind, shots, n, base in [("mc_fewshot", "multiple choice", 2, 8, 25), ("unused_task", "multiple choice", 0, 9, 20),
                                            ("mc_zeroshot", "multiple choice", 0, 6, 50), ("schema_task", "schema", 1, 6, 50),
                                            ("lm_task", "language modeling", 2, 6, 0)]:
            w.writerow([label, "test", kind, shots, n, base, ""])
    return bundle_dir


@pytest.fixture(scope="module")
def bundle(nanochat_base_dir):
    """The tiny bundle at <base>/eval_bundle, where the trainer and scripts.base_eval look by default."""
    return write_bundle(os.path.join(nanochat_base_dir, "eval_bundle"))


class PreferModel:
    """Stands in for the GPT: after any prefix of one of the preferred rows it predicts that row's next
    token with logit 10, and is uniform everywhere else."""

    def __init__(self, preferred_rows, vocab_size):
        self.vocab_size = vocab_size
        self.next = {tuple(row[:j + 1]): row[j + 1] for row in preferred_rows for j in range(len(row) - 1)}

    def __call__(self, x):
        B, T = x.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b, row in enumerate(x.tolist()):
            for j in range(T):
                nxt = self.next.get(tuple(row[:j + 1]))
                if nxt is not None:
                    logits[b, j, nxt] = 10.0
        return logits


def preferred_rows(tasks, tokenizer, pick):
    """Token rows of the prompt pick(task, item) chooses for every example (None: prefer nothing)."""
    rows = []
    for task in tasks:
        for i, item in enumerate(task.examples):
            choice = pick(task, item)
            if choice is not None:
                prompts = render_prompts(task.task_type, item, fewshot_examples(task.examples, i, task.num_fewshot),
                                         task.delimiter)
                rows.append(tokenizer.encode(prompts[choice], prepend=tokenizer.get_bos_token_id()))
    return rows

# -----------------------------------------------------------------------------
# Prompts


def test_prompts_render_shots_and_delimiters_like_upstream():
    shots = [dict(query="Q: 2+2?", choices=["5", "4"], gold=1), dict(query="Q: 0+1?", choices=["1", "0"], gold=0)]
    item = dict(query="Q: 1+1?", choices=["2", "3"], gold=0)
    assert render_prompts("multiple_choice", item, shots, "\nAnswer: ") == [
        "Q: 2+2?\nAnswer: 4\n\nQ: 0+1?\nAnswer: 1\n\nQ: 1+1?\nAnswer: 2",
        "Q: 2+2?\nAnswer: 4\n\nQ: 0+1?\nAnswer: 1\n\nQ: 1+1?\nAnswer: 3"]
    shot = dict(context_options=["Xa", "Xb"], continuation="ran.", gold=1)
    item = dict(context_options=["A fed B because A", "A fed B because B"], continuation="was hungry.", gold=1)
    assert render_prompts("schema", item, [shot], " ") == [
        "Xb ran.\n\nA fed B because A was hungry.", "Xb ran.\n\nA fed B because B was hungry."]
    shot = dict(context="Q: capital of Spain?\n", continuation="Madrid")
    item = dict(context="  Q: capital of France? ", continuation="Paris")
    assert render_prompts("language_modeling", item, [shot], "\nA: ") == [
        "Q: capital of Spain?\nA: Madrid\n\nQ: capital of France?\nA:",
        "Q: capital of Spain?\nA: Madrid\n\nQ: capital of France?\nA: Paris"]
    assert render_prompts("multiple_choice", dict(query="Birds can", choices=["fly", "read"], gold=0), [], " ") == [
        "Birds can fly", "Birds can read"]


def test_bundle_loads_shuffled_with_shots_and_default_delimiter(bundle):
    tasks = load_tasks(bundle)
    assert [(t.label, t.task_type, t.num_fewshot, t.delimiter, t.baseline) for t in tasks] == [
        ("mc_fewshot", "multiple_choice", 2, "\nAnswer: ", 25.0), ("mc_zeroshot", "multiple_choice", 0, " ", 50.0),
        ("schema_task", "schema", 1, " ", 50.0), ("lm_task", "language_modeling", 2, "\nA: ", 0.0)]
    expected = [dict(query=q, choices=c, gold=g) for q, c, g in MC_FEWSHOT]
    random.Random(1337).shuffle(expected)  # upstream's order, so --max-per-task keeps the same examples
    assert tasks[0].examples == expected
    assert [e["query"] for e in load_tasks(bundle, max_per_task=3)[0].examples] == [e["query"] for e in expected[:3]]
    mc = tasks[0]
    for i, item in enumerate(mc.examples):
        shots = fewshot_examples(mc.examples, i, 2)
        assert len(shots) == 2 and item not in shots and shots[0] != shots[1]
        others = [j for j in range(len(mc.examples)) if j != i]  # upstream's draw: sample the other indices
        assert shots == [mc.examples[j] for j in random.Random(1234 + i).sample(others, 2)]
        prompts = render_prompts(mc.task_type, item, shots, mc.delimiter)
        assert prompts[item["gold"]] == (f"{shots[0]['query']}\nAnswer: {shots[0]['choices'][shots[0]['gold']]}\n\n"
                                         f"{shots[1]['query']}\nAnswer: {shots[1]['choices'][shots[1]['gold']]}\n\n"
                                         f"{item['query']}\nAnswer: {item['choices'][item['gold']]}")


def test_fewshot_draws_match_sampling_the_list_of_other_examples():
    examples = list(range(500))
    for idx in (0, 1, 250, 498, 499):
        for k in (1, 3, 10):
            others = [j for j in examples if j != idx]
            assert fewshot_examples(examples, idx, k) == random.Random(1234 + idx).sample(others, k)
    assert fewshot_examples([7], 0, 3) == [] and fewshot_examples([7, 8], 1, 3) == [7]


def test_scored_spans_are_the_answers(bundle, tiny_tokenizer):
    tok = tiny_tokenizer
    for task in load_tasks(bundle):
        for i, item in enumerate(task.examples):
            prompts = render_prompts(task.task_type, item, fewshot_examples(task.examples, i, task.num_fewshot), task.delimiter)
            rows, spans = score_spans(task.task_type, tok.encode(prompts, prepend=tok.get_bos_token_id()))
            answers = {"multiple_choice": item.get("choices"), "language_modeling": [item.get("continuation")],
                       "schema": [item.get("continuation")] * len(rows)}[task.task_type]
            assert len(rows) == len(answers)
            for row, (start, end), answer, prompt in zip(rows, spans, answers, prompts[-len(rows):]):
                assert tok.decode(row[1:]) == prompt and end == len(row) and 1 <= start < end
                span = tok.decode(row[start:end])
                # The span is the answer's tokens. As upstream: a first token that all choices share stays
                # in the context; a last token that all context options share joins the continuation.
                if task.task_type == "multiple_choice":
                    assert span.strip() and (" " + answer).endswith(span), (task.label, span, answer)
                elif task.task_type == "schema":
                    assert span.endswith(" " + answer), (task.label, span, answer)
                else:
                    assert span == " " + answer


def test_crop_keeps_the_end_and_the_span():
    assert crop(list(range(10)), 7, 10, 4) == ([6, 7, 8, 9], 1, 4)
    assert crop(list(range(10)), 2, 10, 4) == ([6, 7, 8, 9], 1, 4)  # a span longer than the limit keeps its tail
    assert crop(list(range(5)), 2, 5, 8) == ([0, 1, 2, 3, 4], 2, 5)

# -----------------------------------------------------------------------------
# Scoring


def test_gold_preferring_model_scores_one_everywhere(bundle, tiny_tokenizer):
    tasks = load_tasks(bundle)
    gold = preferred_rows(tasks, tiny_tokenizer, lambda t, item: 1 if t.task_type == "language_modeling" else item["gold"])
    out = CoreEval(tasks, tiny_tokenizer, max_len=1000, max_tokens=256).evaluate(
        PreferModel(gold, tiny_tokenizer.get_vocab_size()), "cpu")
    assert {k: (r["accuracy"], r["centered"]) for k, r in out["tasks"].items()} == {k: (1.0, 1.0) for k in FIRST_CHOICE}
    assert out["core_metric"] == 1.0


def test_first_choice_model_scores_its_baseline_centred_value(bundle, tiny_tokenizer):
    tasks = load_tasks(bundle)
    # always the first choice / context option; for language modeling it prefers nothing (greedy never matches)
    first = preferred_rows(tasks, tiny_tokenizer, lambda t, item: None if t.task_type == "language_modeling" else 0)
    model = PreferModel(first, tiny_tokenizer.get_vocab_size())
    out = CoreEval(tasks, tiny_tokenizer, max_len=1000, max_tokens=256).evaluate(model, "cpu")
    assert out["tasks"]["mc_fewshot"]["accuracy"] == 0.5 and out["tasks"]["mc_zeroshot"]["accuracy"] == 2 / 6
    for label, value in FIRST_CHOICE.items():
        assert out["tasks"][label]["centered"] == pytest.approx(value, abs=1e-12), label
    assert out["core_metric"] == pytest.approx(1 / 12, abs=1e-12)
    # a uniform model ties every choice: the first wins, the same numbers
    uniform = CoreEval(tasks, tiny_tokenizer, max_len=1000, max_tokens=64).evaluate(PreferModel([], 512), "cpu")
    assert uniform["core_metric"] == pytest.approx(1 / 12, abs=1e-12)


def test_choices_are_compared_by_mean_loss_per_token(tiny_tokenizer):
    tok = tiny_tokenizer
    task = core_eval.Task("t", "multiple_choice", 0, " ", 50.0,
                          [dict(query="Pick one:", choices=["no", "the longer answer here"], gold=1)])
    rows, spans = score_spans("multiple_choice", tok.encode(render_prompts("multiple_choice", task.examples[0], [], " "),
                                                            prepend=tok.get_bos_token_id()))
    assert [e - s for s, e in spans][1] >= 3
    # The model expects " zebra" after the query: both answers' first tokens cost ~10 nats; the long
    # answer's later tokens are unknown prefixes (uniform, log 512 = 6.2 nats each). Its mean loss is
    # lower, its summed loss higher: CORE compares means, so the long (gold) answer wins.
    model = PreferModel([tok.encode("Pick one: zebra", prepend=tok.get_bos_token_id())], tok.get_vocab_size())
    mean_loss, _ = core_eval.score_rows(model, [torch.tensor(r).numpy() for r in rows], spans, "cpu")
    sums = [m * (e - s) for m, (s, e) in zip(mean_loss, spans)]
    assert mean_loss[1] < mean_loss[0] and sums[1] > sums[0]
    assert CoreEval([task], tok, 1000, 256).evaluate(model, "cpu")["tasks"]["t"]["accuracy"] == 1.0


def test_batches_split_across_ranks_cover_the_single_process_batches(bundle, tiny_tokenizer):
    tasks = load_tasks(bundle)
    one = CoreEval(tasks, tiny_tokenizer, 1000, 200).batches
    assert len(one) > 3 and all(sum(len(e.rows) for e in b) * max(len(r) for e in b for r in e.rows) <= 200
                                for b in one if len(b) > 1)
    for world in (2, 3):
        split = [CoreEval(tasks, tiny_tokenizer, 1000, 200, rank=r, world_size=world).batches for r in range(world)]
        interleaved = [split[i % world][i // world] for i in range(len(one))]
        assert [[(e.task, e.gold, [r.tolist() for r in e.rows], e.spans) for e in b] for b in interleaved] == \
               [[(e.task, e.gold, [r.tolist() for r in e.rows], e.spans) for e in b] for b in one]

# -----------------------------------------------------------------------------
# Per-row losses against a reference written from the metric's definition


class TinyGPTWithPreferences:
    """A 1-layer GPT with seeded random weights (every row gets its own losses), plus logit 30 on the
    next token after any prefix of a preferred row (so greedy decoding reproduces those rows)."""

    def __init__(self, preferred, vocab_size, sequence_len):
        from nanochat.gpt import GPT, GPTConfig
        torch.manual_seed(0)
        self.gpt = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                                 n_embd=32))
        self.gpt.init_weights()
        with torch.no_grad():
            for p in self.gpt.parameters():  # init_weights zeroes the output projections: every weight random here
                p.normal_(0, 0.2)
        self.gpt.eval()
        self.trie = {}  # token -> (subtree, the token that follows this prefix in a preferred row)
        for row in preferred:
            node = self.trie
            for tok, nxt in zip(row, list(row[1:]) + [None]):
                sub, _ = node.setdefault(tok, ({}, nxt))
                node = sub

    @torch.no_grad()
    def __call__(self, x):
        logits = self.gpt(x).float()
        for b, row in enumerate(x.tolist()):
            node = self.trie
            for j, tok in enumerate(row):
                if tok not in node:
                    break
                node, nxt = node[tok]
                if nxt is not None:
                    logits[b, j, nxt] += 30.0
        return logits


def reference_rows(task_type, prompts, tokenizer):
    """(rows, continuations) by the DCLM definition: a multiple-choice row's continuation is its tokens after
    the longest token prefix all choices share; a schema row's is the longest token suffix all context
    options share; a language-modeling row's is the full prompt's tokens after the context-only prompt's."""
    rows = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":
        shared = len(os.path.commonprefix(rows))
        return rows, [(shared, len(r)) for r in rows]
    if task_type == "schema":
        shared = len(os.path.commonprefix([r[::-1] for r in rows]))
        return rows, [(len(r) - shared, len(r)) for r in rows]
    context, full = rows
    return [full], [(len(os.path.commonprefix([context, full])), len(full))]


def reference_scores(model, rows, continuations):
    """Per row, scored alone (no batch, no padding): the mean over its continuation tokens of
    -log p(token | every token before it), and whether the argmax at each of those positions is the token."""
    out = []
    for row, (start, end) in zip(rows, continuations):
        assert 1 <= start < end == len(row)
        logp = model(torch.tensor([row]))[0].log_softmax(-1)
        losses = [-logp[t - 1, row[t]].item() for t in range(start, end)]
        greedy = all(logp[t - 1].argmax().item() == row[t] for t in range(start, end))
        out.append((sum(losses) / len(losses), greedy))
    return out


def test_core_eval_losses_and_choices_match_the_reference(bundle, tiny_tokenizer):
    tok = tiny_tokenizer
    tasks = load_tasks(bundle)
    # the model prefers every other language-modeling prompt: greedy decoding reproduces those continuations
    lm_rows = preferred_rows(tasks, tok, lambda t, item: 1 if t.task_type == "language_modeling" else None)
    model = TinyGPTWithPreferences(lm_rows[::2], tok.get_vocab_size(), sequence_len=64)
    expected = []  # per example: (task label, row losses, row greedy flags, chosen row or greedy)
    for task in tasks:
        for i, item in enumerate(task.examples):
            prompts = render_prompts(task.task_type, item, fewshot_examples(task.examples, i, task.num_fewshot),
                                     task.delimiter)
            scores = reference_scores(model, *reference_rows(task.task_type, prompts, tok))
            losses, greedy = [s[0] for s in scores], [s[1] for s in scores]
            decided = greedy[0] if task.task_type == "language_modeling" else losses.index(min(losses))
            expected.append((task.label, losses, greedy, decided))
    # what CoreEval scores, batched and padded as evaluate() batches them
    ev = CoreEval(tasks, tok, max_len=1000, max_tokens=256)
    got = []
    for batch in ev.batches:
        mean_loss, greedy = core_eval.score_rows(model, [r for ex in batch for r in ex.rows],
                                                 [s for ex in batch for s in ex.spans], "cpu")
        for ex in batch:
            n = len(ex.rows)
            losses, flags, mean_loss, greedy = mean_loss[:n], greedy[:n], mean_loss[n:], greedy[n:]
            decided = flags[0] if ex.gold < 0 else losses.index(min(losses))
            got.append((tasks[ex.task].label, losses, flags, decided))
    assert len(got) == len(expected) == sum(len(t.examples) for t in tasks)
    for (label, losses, flags, decided), (ref_label, ref_losses, ref_flags, ref_decided) in zip(got, expected):
        assert label == ref_label
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5), label
        assert (flags, decided) == (ref_flags, ref_decided), label
    # the reference decides differently across examples: a scoring bug cannot hide behind one constant answer
    for label in ("mc_fewshot", "mc_zeroshot", "schema_task", "lm_task"):
        assert len({e[3] for e in expected if e[0] == label}) > 1, label
    # and evaluate()'s accuracies are the reference's
    out = ev.evaluate(model, "cpu")
    for task in tasks:
        rows = [e for e in expected if e[0] == task.label]
        right = [e[3] is True if task.task_type == "language_modeling" else e[3] == item["gold"]
                 for e, item in zip(rows, task.examples)]
        assert out["tasks"][task.label]["accuracy"] == pytest.approx(sum(right) / len(right), abs=1e-12), task.label

# -----------------------------------------------------------------------------
# The bundle: missing, downloaded


def test_missing_bundle_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"no CORE eval bundle in .*run `python -m scripts.base_eval --download-bundle`"):
        load_tasks(str(tmp_path / "nothing"))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--model-tag", "x", "--device-type", "cpu"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: no CORE eval bundle in {tmp_path}/eval_bundle (missing core.yaml): "
                                f"run `python -m scripts.base_eval --download-bundle`")


def test_download_bundle_unpacks_a_zip(tmp_path):
    src = write_bundle(str(tmp_path / "src" / "eval_bundle"))
    zip_path = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for d, _, files in os.walk(src):
            for name in files:
                full = os.path.join(d, name)
                z.write(full, os.path.relpath(full, os.path.dirname(src)))  # entries under eval_bundle/, like upstream's
    from scripts.base_eval import build_arg_parser, evaluate
    dest = str(tmp_path / "base" / "eval_bundle")
    evaluate(build_arg_parser().parse_args(["--download-bundle", "--bundle-url", f"file://{zip_path}", "--bundle-dir", dest]))
    assert [t.examples for t in load_tasks(dest)] == [t.examples for t in load_tasks(src)]
    assert sorted(os.listdir(tmp_path / "base")) == ["eval_bundle"]  # no zip or temp dir left behind
    with pytest.raises(UserError, match="could not download the eval bundle"):
        core_eval.download_bundle(str(tmp_path / "other"), url=f"file://{tmp_path}/missing.zip", log=lambda *a: None)
    # a plain path is the file it names; a plain path to nothing is one line
    plain = str(tmp_path / "plain" / "eval_bundle")
    core_eval.download_bundle(plain, url=str(zip_path), log=lambda *a: None)
    assert [t.examples for t in load_tasks(plain)] == [t.examples for t in load_tasks(src)]
    with pytest.raises(UserError, match=rf"^--bundle-url {tmp_path}/missing.zip is neither a file nor a URL: give the "
                                        r"path of eval_bundle.zip, a file:// URL or an https:// URL$"):
        core_eval.download_bundle(str(tmp_path / "other"), url=f"{tmp_path}/missing.zip", log=lambda *a: None)

# -----------------------------------------------------------------------------
# Real checkpoints: the trainer's --core-metric-every and scripts.base_eval

TINY = ["--device-type", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32",
        "--device-batch-size", "4", "--total-batch-size", "256", "--warmup-steps", "2", "--eval-tokens", "512",
        "--sample-every", "0", "--eval-every", "-1", "--matrix-lr", "0.04", "--core-metric-max-per-task", "-1"]


def train_tiny(*extra):
    from nanochat.flags import build_arg_parser
    from nanochat.train import train
    return train(build_arg_parser().parse_args(TINY + list(extra)))


def base_eval(*flags):
    from scripts.base_eval import build_arg_parser, evaluate
    return evaluate(build_arg_parser().parse_args(["--device-type", "cpu", *flags]))


@pytest.fixture(scope="module")
def trained(bundle, tiny_data_dir, tiny_tokenizer, nanochat_base_dir):
    return train_tiny("--num-iterations", "12", "--core-metric-every", "6", "--model-tag", "core_e2e")


def test_trainer_logs_core_and_reports_it(trained, nanochat_base_dir):
    h, s = trained["history"], trained["summary"]
    assert h["core_step"] == [6, 12] and len(h["core_metric"]) == 2
    assert s["core_metric"] == h["core_metric"][-1] and -1 <= s["core_metric"] <= 1
    assert set(s["core"]["tasks"]) == set(FIRST_CHOICE) and s["core_step"] == 12
    report = open(os.path.join(nanochat_base_dir, "report", "core_e2e.md")).read()
    assert "## CORE at step 12" in report and "| **CORE** |" in report and f"| core_metric | {s['core_metric']:,.4f} |" in report


def test_base_eval_matches_what_the_trainer_measured(trained, tmp_path):
    out = base_eval("--model-tag", "core_e2e", "--out-dir", str(tmp_path))
    s = trained["summary"]
    assert out["step"] == 12 and out["core"]["tasks"] == s["core"]["tasks"]
    assert out["core"]["core_metric"] == s["core_metric"]
    assert out["bpb"]["val"] == s["val_bpb"]  # same batches, same eval steps: the trainer's number
    assert len(out["samples"]) == 3
    saved = json.load(open(tmp_path / "core_e2e_eval_000012.json"))
    assert saved["core"]["core_metric"] == out["core"]["core_metric"]
    md = open(tmp_path / "core_e2e_eval_000012.md").read()
    assert "| lm_task | language_modeling | 2 | 6 |" in md and "GPT-2 1.5B's 0.2565" in md and "val bpb" in md


def test_two_process_gloo_core_equals_one_process(trained, nanochat_base_dir, tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=nanochat_base_dir, OMP_NUM_THREADS="1")
    args = ["-m", "scripts.base_eval", "--model-tag", "core_e2e", "--device-type", "cpu", "--eval", "core",
            "--device-batch-size", "2"]  # 64-token batches: several per rank
    runs = {1: [sys.executable], 2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]}
    results = {}
    for n, launcher in runs.items():
        r = subprocess.run(launcher + args + ["--out-dir", str(tmp_path / str(n))], capture_output=True, text=True,
                           env=env, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        results[n] = json.load(open(tmp_path / str(n) / "core_e2e_eval_000012.json"))
    assert results[2]["world_size"] == 2
    assert results[2]["core"]["tasks"] == results[1]["core"]["tasks"]
    assert results[2]["core"]["core_metric"] == results[1]["core"]["core_metric"]


@pytest.mark.parametrize("mode", [["--sparse", "--sparse-backend", "masked"], ["--fp8"]],
                         ids=["sparse_masked", "fp8_flag_trains_dense_on_cpu"])
def test_sparse_and_fp8_flag_checkpoints_evaluate(bundle, tiny_data_dir, tiny_tokenizer, mode, tmp_path, capsys):
    """On CPU --fp8 trains dense (fp8 needs a CUDA GPU of compute capability >= 8.9): that case checks that the
    checkpoint of such a run (its meta says fp8) evaluates, not fp8 arithmetic."""
    tag = "core_" + mode[0].strip("-")
    s = train_tiny("--num-iterations", "4", "--core-metric-every", "-1", "--model-tag", tag, *mode)["summary"]
    if mode == ["--fp8"]:
        assert "Warning: --fp8 requires a CUDA GPU" in capsys.readouterr().out
    out = base_eval("--model-tag", tag, "--eval", "core,bpb", "--out-dir", str(tmp_path))
    assert out[mode[0].strip("-")] is True
    # the sparse checkpoint's 2:4 masks are recomputed from its weights: bpb and CORE are the trainer's
    assert out["bpb"]["val"] == s["val_bpb"] and out["core"]["core_metric"] == s["core_metric"]


def test_trainer_without_bundle_fails_at_startup(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="missing core.yaml.*--download-bundle"):
        train_tiny("--num-iterations", "2", "--core-metric-every", "5")
    assert os.listdir(tmp_path) == []  # nothing started: no checkpoints, no report


def test_unknown_eval_is_one_clear_error():
    with pytest.raises(UserError, match="unknown --eval perplexity"):
        base_eval("--model-tag", "x", "--eval", "core,perplexity")


def test_bundle_url_without_download_bundle_says_it_needs_it():
    with pytest.raises(UserError, match=r"^--bundle-url is where --download-bundle fetches the eval bundle from: add "
                                        r"--download-bundle"):
        base_eval("--model-tag", "x", "--bundle-url", "file:///tmp/eval_bundle.zip")
