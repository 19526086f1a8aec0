"""Every committed record (benchmarks/results) can be run again: each command it holds (the command lines of its
markdown, the `command` fields of its JSON, its row's command in benchmarks/results/README.md) parses with
today's argument parsers, through the launchers (python, torchrun) and the benchmarks/gpu.sh stages as they are
today. The records that README lists under "Historical records" are skipped, and must indeed fail; the
commands that list gives instead must parse.

A command shown as a pattern names its blanks: an all-caps word stands for a number (NPROC, TOKENS), `[--flag]`
for a flag that some rows have, `<...>` for a path; they are filled in (1, the flag, a path) before parsing.
A README command with `...` elides what its record holds in full, and is not parsed itself."""

import contextlib
import functools
import glob
import importlib
import io
import json
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
COMMAND = re.compile(r"(\w+=\S+ )*(python3?|torchrun|bash \S+|\S*/python3?)( |$)")


def code_spans(text):
    return re.findall(r"`([^`\n]+)`", text)


def readme_tables():
    """{section title: [{column: cell}]} of benchmarks/results/README.md's tables (the first one's title is "")."""
    tables, title, header = {}, "", None
    for line in open(os.path.join(RESULTS, "README.md")).read().splitlines():
        if line.startswith("## "):
            title, header = line[3:].strip(), None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if header is None:
                header = cells
                tables[title] = []
            else:
                tables[title].append(dict(zip(header, cells)))
        elif not line.startswith("|"):
            header = None
    return tables


def record_of(row):
    return re.match(r"\[(\w+)\.md\]", row["file"]).group(1)


def historical():
    """{record: (why, today's nearest command cell)}: the one list of records that cannot be re-run as recorded."""
    return {record_of(r): (r["why it cannot be re-run as recorded"], r["today's nearest command"])
            for r in readme_tables()["Historical records"]}


def records():
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(RESULTS, "*.md")) if not p.endswith("README.md"))


def json_commands(obj):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "command" and isinstance(value, str):
                yield value
            elif key == "commands" and isinstance(value, dict):
                yield from (v for v in value.values() if isinstance(v, str))
            else:
                yield from json_commands(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from json_commands(value)


def record_commands(record):
    """[(where, command)] of one record: its markdown's command spans, its JSON's commands, its README row's."""
    found = [(f"{record}.md", s) for s in code_spans(open(os.path.join(RESULTS, f"{record}.md")).read())
             if COMMAND.match(s)]
    for path in (os.path.join(RESULTS, f"{record}.json"), os.path.join(RESULTS, f"{record}_meta.json")):
        if os.path.exists(path):
            found += [(os.path.basename(path), c) for c in dict.fromkeys(json_commands(json.load(open(path))))]
    rows = [r for rows in readme_tables().values() for r in rows if record_of(r) == record]
    for row in rows:
        cell = row.get("command") or row.get("command as recorded")
        found += [("README.md", s) for s in code_spans(cell) if COMMAND.match(s) and "..." not in s]
    return found


# -----------------------------------------------------------------------------
# Parsing a command line with today's parsers


@functools.lru_cache(maxsize=None)
def gpu_stages():
    """{stage: (module or None, the arguments gpu.sh puts before the caller's, names of the positional arguments
    the stage takes first)}, read from benchmarks/gpu.sh's case statement."""
    text = open(os.path.join(ROOT, "benchmarks", "gpu.sh")).read()
    stages = {}
    for name, arm in re.findall(r"^  (\w+)\)(.*?);;[ \t]*(?:#[^\n]*)?$", text[text.index("case $stage in"):], re.S | re.M):
        m = re.search(r"-m (\S+)(.*?)\"\$@\"", arm, re.S)
        positional = [var for var, _ in sorted(re.findall(r"(\w+)=\$(\d)", arm), key=lambda v: v[1])]
        stages[name] = (m.group(1), shlex.split(m.group(2)), positional) if m else (None, [], positional)
    return stages


def fill_blanks(tokens):
    out = []
    for t in tokens:
        t = re.sub(r"^\[|\]$", "", t)
        out.append("1" if re.fullmatch(r"[A-Z][A-Z_]*", t) else t)
    return out


def split_commands(command):
    lex = shlex.shlex(re.sub(r"<[^<>]*>", "PATH", command), posix=True, punctuation_chars=";")
    lex.whitespace_split = True
    commands, current = [], []
    for token in lex:
        if token == ";":
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [fill_blanks(c) for c in commands + [current] if c]


SEPARATOR_MODULES = ("scripts.base_train", "scripts.base_eval")  # the scripts that call flags.strip_separator


def parse_module_args(module, args):
    """None, or why `python -m module args` does not parse today."""
    if module == "pytest":
        missing = [a for a in args if a.startswith("tests/") and not os.path.exists(os.path.join(ROOT, a.split("::")[0]))]
        return f"pytest: no {', '.join(missing)}" if missing else None
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        return f"no module {e.name}"
    if not hasattr(mod, "build_arg_parser"):
        return f"{module} has no build_arg_parser()"
    if module in SEPARATOR_MODULES:  # as their __main__ does: a leading `--` (torchrun's form) is dropped
        from nanochat.flags import strip_separator
        args = strip_separator(args)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            mod.build_arg_parser().parse_args(args)
    except SystemExit:
        return f"{module}: {err.getvalue().strip().splitlines()[-1]}"
    return None


def parse_stage(args):
    """None, or why `bash benchmarks/gpu.sh ARGS` does not run today."""
    stage, args = args[0], args[1:]
    stages = gpu_stages()
    if stage not in stages:
        return f"gpu.sh has no stage {stage}"
    if stage == "parallel":  # each argument: "[@GPUS ]STAGE ARGS[; STAGE ARGS]"
        for stage_list in args:
            for part in re.sub(r"^@[\d,]+ ", "", stage_list).split(";"):
                why = parse_stage(fill_blanks(shlex.split(part)))
                if why:
                    return why
        return None
    if stage == "smi":
        return None if len(args) <= 1 and all(a.isdigit() for a in args) else f"smi takes SECONDS, got {args}"
    module, before, positional = stages[stage]
    if module is None:
        return f"gpu.sh {stage} takes no arguments, got {args}" if args else None
    if len(args) < len(positional):
        return f"gpu.sh {stage} takes {' '.join(positional).upper()} first"
    values = dict(zip(positional, args))  # $nproc and the like; $OUT and other settings: any path
    before = [re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), "x"), t) for t in before]
    return parse_module_args(module, before + args[len(positional):])


def parse_command(tokens):
    """None, or why one command line (tokens) does not run with today's code."""
    while tokens and re.match(r"\w+=", tokens[0]):  # OUT=... and other environment settings
        tokens = tokens[1:]
    if tokens[:1] in (["bash"], ["sh"]):
        if tokens[1] != "benchmarks/gpu.sh":
            return f"no {tokens[1]}" if not os.path.exists(os.path.join(ROOT, tokens[1])) else f"not gpu.sh: {tokens[1]}"
        return parse_stage(tokens[2:])
    if tokens[0] == "torchrun" or tokens[1:3] == ["-m", "torch.distributed.run"]:
        tokens = tokens[1:] if tokens[0] == "torchrun" else tokens[3:]
        while tokens and tokens[0] != "-m":  # the launcher's own options
            tokens = tokens[1:]
    elif re.fullmatch(r"(\S*/)?python3?", tokens[0]):
        tokens = tokens[1:]
    else:
        return f"not a python, torchrun or gpu.sh command: {tokens[0]}"
    if tokens[:1] != ["-m"] or len(tokens) < 2:
        return f"no -m MODULE in {tokens}"
    return parse_module_args(tokens[1], tokens[2:])


def failures(commands):
    out = []
    for where, command in commands:
        for tokens in split_commands(command):
            why = parse_command(tokens)
            if why:
                out.append(f"{where}: `{command}`: {why}")
    return out

# -----------------------------------------------------------------------------


def test_the_parser_reads_commands_as_the_launchers_do():
    assert parse_command(split_commands("torchrun --standalone --nproc_per_node=2 -m scripts.base_train --depth 20")[0]) is None
    assert parse_command(split_commands("/x/.venv/bin/python -m torch.distributed.run --nproc_per_node 2 -m "
                                        "scripts.base_train --depth 2")[0]) is None
    assert "unrecognized arguments: --steps" in parse_command(split_commands("bash benchmarks/gpu.sh train --steps 20")[0])
    assert parse_command(split_commands("bash benchmarks/gpu.sh optim 2 --depth 20")[0]) is None
    assert "expected one argument" in parse_command(split_commands("python -m benchmarks.bench_parity --trainer-flags --device-type cpu")[0])
    assert parse_command(split_commands("python -m benchmarks.bench_parity --trainer-flags '--device-type cpu'")[0]) is None
    assert parse_command(split_commands("bash benchmarks/gpu.sh ddp NPROC NAME --depth 20 --total-batch-size TOKENS "
                                        "[--sparse]")[0]) is None
    assert parse_command(split_commands("bash benchmarks/gpu.sh nothing")[0]) == "gpu.sh has no stage nothing"
    assert parse_command(split_commands("python -m benchmarks.nothing")[0]) == "no module benchmarks.nothing"
    assert len(split_commands("python -m a; python -m b")) == 2
    assert "no tests/test_nothing.py" in parse_command(split_commands(
        'bash benchmarks/gpu.sh parallel "tests tests/test_gpt.py" "env; tests tests/test_nothing.py"')[0])


def test_every_results_file_belongs_to_a_record_listed_in_the_index():
    listed = {record_of(r) for rows in readme_tables().values() for r in rows}
    assert listed == set(records())
    assert set(historical()) <= listed
    for path in glob.glob(os.path.join(RESULTS, "*.json")):
        name = os.path.basename(path)[:-5]
        assert name.removesuffix("_meta") in listed, name


@pytest.mark.parametrize("record", records())
def test_record_commands_parse_with_todays_flags(record):
    if record in historical():
        pytest.skip(f"historical record: {historical()[record][0]}")
    commands = record_commands(record)
    assert commands, f"{record} holds no command"
    assert failures(commands) == []


@pytest.mark.parametrize("record", sorted(historical()))
def test_historical_records_fail_and_name_a_command_that_runs(record):
    """The list holds exactly the records that cannot be re-run as recorded, and gives what can."""
    assert failures(record_commands(record)), f"{record}'s commands all parse: drop it from the historical list"
    today = [("README.md", s) for s in code_spans(historical()[record][1]) if COMMAND.match(s)]
    assert today and failures(today) == []


def test_the_scripts_that_take_a_leading_separator_are_the_ones_listed():
    scripts = sorted(f"scripts.{f[:-3]}" for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith(".py")
                     and "strip_separator" in open(os.path.join(ROOT, "scripts", f)).read())
    assert scripts == sorted(SEPARATOR_MODULES)
