"""Shared test fixtures: a tiny corpus and tokenizer under a temporary NANOCHAT_BASE_DIR.

Fixtures (all session-scoped, built once, a few seconds in total):
  nanochat_base_dir  str: a temp dir; NANOCHAT_BASE_DIR points at it for the rest of the session,
                     so nothing a test writes lands in ~/.cache/nanochat.
  tiny_data_dir      str: <base>/base_data with 4 shards of the first 150 stdlib .py files
                     (40 docs per shard, 8 docs per row group; the last shard is val).
  tiny_tokenizer     nanochat.tokenizer.Tokenizer: vocab 512, trained on tiny_data_dir's train split
                     and saved to <base>/tokenizer (so get_tokenizer() finds it).
"""

import os

import pytest

TINY_VOCAB_SIZE = 512
TINY_DOCS_PER_SHARD = 40
TINY_DOCS_PER_ROW_GROUP = 8
TINY_MAX_FILES = 150


@pytest.fixture(scope="session")
def nanochat_base_dir(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("nanochat_base"))
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = base
    yield base
    if old is None:
        os.environ.pop("NANOCHAT_BASE_DIR", None)
    else:
        os.environ["NANOCHAT_BASE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_data_dir(nanochat_base_dir):
    from nanochat.dataset import write_default_corpus
    data_dir = os.path.join(nanochat_base_dir, "base_data")
    write_default_corpus(data_dir, max_files=TINY_MAX_FILES, docs_per_shard=TINY_DOCS_PER_SHARD,
                         docs_per_row_group=TINY_DOCS_PER_ROW_GROUP)
    return data_dir


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_data_dir, nanochat_base_dir):
    from scripts.tok_train import train_tokenizer
    tokenizer, _ = train_tokenizer(TINY_VOCAB_SIZE, max_chars=2_000_000, doc_cap=10_000, data_dir=tiny_data_dir,
                                   out_dir=os.path.join(nanochat_base_dir, "tokenizer"))
    return tokenizer
