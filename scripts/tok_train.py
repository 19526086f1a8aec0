"""Train the BPE tokenizer on the training shards and save it to <base>/tokenizer.

python -m scripts.tok_train --vocab-size 4096 --max-chars 20000000
"""

import argparse
import time

import os

from nanochat.common import UserError, get_base_dir, run_main
from nanochat.dataset import get_data_dir, iter_docs
from nanochat.tokenizer import Tokenizer, check_replace, get_tokenizer_dir


def iter_training_text(max_chars, doc_cap, data_dir=None):
    """Train-split documents, each cut to doc_cap characters, until max_chars characters in total."""
    n_chars = 0
    for doc in iter_docs("train", data_dir):
        doc = doc[:doc_cap]
        yield doc
        n_chars += len(doc)
        if n_chars >= max_chars:
            return


def train_tokenizer(vocab_size, max_chars, doc_cap, data_dir=None, out_dir=None, overwrite=False):
    """Train, save and return (tokenizer, characters trained on). A tokenizer of another vocab size in out_dir
    is replaced only with overwrite (nanochat.tokenizer.check_replace)."""
    if max_chars <= 0 or doc_cap <= 0:
        raise UserError("--max-chars and --doc-cap must be positive")
    out_dir = out_dir or get_tokenizer_dir()
    check_replace(out_dir, vocab_size, overwrite, os.path.join(get_base_dir(), "base_checkpoints"))
    counted = {"chars": 0}

    def counting(texts):
        for text in texts:
            counted["chars"] += len(text)
            yield text

    tokenizer = Tokenizer.train_from_iterator(counting(iter_training_text(max_chars, doc_cap, data_dir)), vocab_size)
    tokenizer.save(out_dir)
    return tokenizer, counted["chars"]


def main():
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the training shards", allow_abbrev=False)
    parser.add_argument("--vocab-size", type=int, default=32768, help="total vocabulary size, special tokens included")
    parser.add_argument("--max-chars", type=int, default=int(2e9), help="train on at most this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters per document")
    parser.add_argument("--data-dir", default=None, help="default: <base>/base_data")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a tokenizer of another vocab size (checkpoints trained with it no longer load)")
    args = parser.parse_args()
    t0 = time.time()
    tokenizer, n_chars = train_tokenizer(args.vocab_size, args.max_chars, args.doc_cap, args.data_dir,
                                         overwrite=args.overwrite)
    elapsed = time.time() - t0
    sample = "The quick brown fox jumps over the lazy dog.\ndef f(x):\n    return x + 1\n"
    ratio = len(sample.encode()) / len(tokenizer.encode(sample))
    print(f"trained on {n_chars:,} chars of {args.data_dir or get_data_dir()} in {elapsed:.1f}s; "
          f"vocab size {tokenizer.get_vocab_size()}; {ratio:.2f} bytes/token on a sample; "
          f"saved to {get_tokenizer_dir()}")


if __name__ == "__main__":
    run_main(main)
