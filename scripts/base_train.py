"""
Pretrain a base model. Single process:
    python -m scripts.base_train --depth=12
Several GPUs:
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth=26 --target-param-data-ratio=8.5 --device-batch-size=16 [--sparse] [--fp8]
"""

from nanochat.common import run_main
from nanochat.flags import build_arg_parser
from nanochat.train import train


def main():
    train(build_arg_parser().parse_args())


if __name__ == "__main__":
    run_main(main)
