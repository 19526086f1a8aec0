"""
Pretrain a base model. Single process:
    python -m scripts.base_train --depth=12
Several GPUs:
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=26 --target-param-data-ratio=8.5 --device-batch-size=16 [--sparse] [--fp8]
(`--` ends torchrun's flags: its parser would read --run=NAME as its own --run-path.)
"""

import sys

from nanochat.common import print0, run_main
from nanochat.flags import build_arg_parser, strip_separator
from nanochat.guards import Stopped
from nanochat.train import train


def main():
    try:
        train(build_arg_parser().parse_args(strip_separator(sys.argv[1:])))
    except Stopped as e:  # SIGINT/SIGTERM: the step was saved; one line with the resume command
        print0(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C during set-up, or a second one: nothing of the step in progress is saved
        print0("interrupted: nothing of the step in progress was saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
