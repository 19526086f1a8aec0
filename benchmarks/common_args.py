"""
The flags the benchmarks share, one spelling and meaning each; every benchmark's build_arg_parser() takes them
from here. Trainer flags keep the trainer's names (nanochat/flags.py); these are the benchmarks' own.
"""

import argparse


def parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


def add_depth(p, default):
    p.add_argument("--depth", type=int, default=default, help="model depth (transformer layers)")


def add_depths(p, default):
    p.add_argument("--depths", type=int, nargs="+", default=default, help="model depths, one configuration each")


def add_modes(p, default, **kwargs):
    p.add_argument("--modes", nargs="+", default=default, help="trainer modes (benchmarks/bench_train.py: MODES)", **kwargs)


def add_micro_batches(p, default, several=False):
    p.add_argument("--micro-batches", type=int, nargs="+" if several else None, default=default,
                   help="micro-batches per optimizer step" + (", one configuration each" if several else ""))


def add_device_batch_size(p, default=16):
    p.add_argument("--device-batch-size", type=int, default=default, help="sequences per micro-batch")


def add_seq_len(p, default=2048):
    p.add_argument("--seq-len", type=int, default=default, help="tokens per sequence (the trainer's --max-seq-len)")


def add_warm_steps(p, default):
    p.add_argument("--warm-steps", type=int, default=default,
                   help="untimed steps before anything is measured (compile, autotune, caches)")


def add_trainer_flags(p):
    p.add_argument("--trainer-flags", default="", help="more scripts.base_train flags for every run, one quoted string")


def add_timeout(p, default):
    p.add_argument("--timeout", type=int, default=default, help="seconds per child process or run")


def add_out(p, default, what="the output files' path prefix"):
    p.add_argument("--out", default=default, help=what)
