"""Pretraining text as parquet shards with a `text` column (the FineWeb-edu layout nanochat uses).

<base>/base_data/shard_00000.parquet, shard_00001.parquet, ...  sorted by name; the last shard is validation.
<base>/base_data/corpus.json   which corpus the shards came from: shards of another one are not added beside them.

Two ways to fill the directory:
  python -m nanochat.dataset --default-corpus   the installed Python stdlib's .py files, no download needed
  python -m nanochat.dataset -n 8               the first 8 FineWeb-edu shards from Hugging Face
"""

import argparse
import json
import os
import random
import re
import sysconfig
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, get_base_dir, run_main

DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
SHARD_NAME = "shard_{index:05d}.parquet"
SHARD_PATTERN = re.compile(r"shard_\d{5,}\.parquet")  # only these count: a stray notes.parquet must not become val
CORPUS_FILE = "corpus.json"
HOW_TO_GET_DATA = "run `python -m nanochat.dataset --default-corpus` (or `-n 8` to download FineWeb-edu shards)"


def get_data_dir():
    return os.path.join(get_base_dir(), "base_data")


def shard_path(data_dir, index):
    return os.path.join(data_dir, SHARD_NAME.format(index=index))


# ---------------------------------------------------------------------------
# Reading

def shard_names(data_dir):
    """Sorted names of the shards in data_dir ([] when there are none or no directory)."""
    return sorted(n for n in os.listdir(data_dir) if SHARD_PATTERN.fullmatch(n)) if os.path.isdir(data_dir) else []


def list_shards(data_dir=None):
    """Sorted paths of all shards in data_dir; a UserError when there are none."""
    data_dir = data_dir or get_data_dir()
    names = shard_names(data_dir)
    if not names:
        raise UserError(f"no data shards in {data_dir}: {HOW_TO_GET_DATA}")
    return [os.path.join(data_dir, n) for n in names]


def split_shards(split, data_dir=None):
    """Shards of one split: 'train' is all but the last shard, 'val' is the last shard."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    shards = list_shards(data_dir)
    if len(shards) < 2:
        raise UserError(f"only {len(shards)} data shard in {data_dir or get_data_dir()}, need at least 2 "
                        f"(train + val, the last shard is val): {HOW_TO_GET_DATA}")
    return shards[:-1] if split == "train" else shards[-1:]


def bad_shard(path, why):
    """The one-line error for a shard that cannot be used. write_default_corpus skips a directory that
    already has shards, so the fix removes the directory first."""
    data_dir = os.path.dirname(path)
    return UserError(f"shard {path} {why}: rebuild the default corpus with `rm -r {data_dir} && "
                     f"python -m nanochat.dataset --default-corpus` (downloaded shards: delete this file and "
                     f"re-run `python -m nanochat.dataset -n N`)")


def open_shard(path):
    """A pyarrow ParquetFile, checked to have a `text` column."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # truncated, not parquet, unreadable
        raise bad_shard(path, f"is not a readable parquet file ({str(e).splitlines()[0][:200]})")
    if "text" not in pf.schema_arrow.names:
        raise bad_shard(path, f"has no `text` column (columns: {pf.schema_arrow.names})")
    return pf


def read_texts(pf, path, row_group):
    """The documents of one row group; a damaged data page is an error naming the shard."""
    try:
        return pf.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise bad_shard(path, f"cannot be read at row group {row_group} ({str(e).splitlines()[0][:200]})")


def list_row_groups(split, data_dir=None):
    """[(shard_path, row_group_index), ...] of a split in reading order: the loader's unit of work."""
    return [(path, i) for path in split_shards(split, data_dir) for i in range(open_shard(path).num_row_groups)]


def read_row_group(path, row_group):
    return read_texts(open_shard(path), path, row_group)


def iter_docs(split, data_dir=None, start=0, step=1):
    """Documents of a split, once, reading row groups start, start+step, ... (one rank's slice)."""
    for path, row_group in list_row_groups(split, data_dir)[start::step]:
        yield from read_row_group(path, row_group)


# ---------------------------------------------------------------------------
# Which corpus a data dir holds

def default_corpus_record(source_dir):
    return {"corpus": "python-files", "source": os.path.abspath(source_dir)}


def download_record(base_url):
    return {"corpus": "download", "source": base_url.rstrip("/")}


def describe(record):
    if record is None:
        return "a corpus it does not record"
    if record.get("corpus") == "python-files":
        return f"the .py files of {record.get('source')} (--default-corpus)"
    return f"the corpus at {record.get('source')}"


def read_corpus_record(data_dir):
    """The data dir's corpus record, or None (no record, or not readable as one)."""
    try:
        with open(os.path.join(data_dir, CORPUS_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def claim_data_dir(data_dir, record, overwrite=False):
    """Before writing `record`'s shards into data_dir: record the corpus, or check that the shards already there
    came from the same one. Shards of another corpus (or of an unrecorded one) are refused, so two corpora
    never mix into one train split; overwrite=True deletes them first. Returns whether shards of this corpus
    are already there."""
    shards = shard_names(data_dir)
    have = read_corpus_record(data_dir)
    if shards and have == record:
        return True
    if shards and not overwrite:
        raise UserError(f"{data_dir} holds {len(shards)} shards of {describe(have)}; adding shards of "
                        f"{describe(record)} would mix two corpora: pass --overwrite to delete them first, or "
                        f"--data-dir (or NANOCHAT_BASE_DIR) for a directory of its own "
                        f"(the tokenizer and checkpoints trained on the old shards stay as they are)")
    for name in shards:
        os.remove(os.path.join(data_dir, name))
    os.makedirs(data_dir, exist_ok=True)
    tmp = os.path.join(data_dir, CORPUS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(data_dir, CORPUS_FILE))
    return False


# ---------------------------------------------------------------------------
# Writing the default corpus

def list_stdlib_sources(source_dir=None):
    """Sorted .py files under the stdlib directory (third-party site-packages excluded)."""
    source_dir = source_dir or sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(source_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def read_text_files(paths):
    """Contents of the files that are readable UTF-8 and non-empty."""
    docs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(text)
    return docs


def write_default_corpus(data_dir=None, source_dir=None, max_files=None, docs_per_shard=512, docs_per_row_group=32,
                         seed=42, overwrite=False):
    """Write the stdlib .py sources as shards; no-op when data_dir already has this corpus's shards, an error
    when it has another corpus's (unless overwrite: claim_data_dir). Returns the shard paths.

    Files are shuffled with a fixed seed so that the validation shard (the last one) looks like the rest,
    not like the alphabetically last modules. Small row groups let up to 8 ranks share the val shard.
    """
    data_dir = data_dir or get_data_dir()
    source_dir = source_dir or sysconfig.get_paths()["stdlib"]
    if claim_data_dir(data_dir, default_corpus_record(source_dir), overwrite):
        return list_shards(data_dir)
    files = list_stdlib_sources(source_dir)[:max_files]
    docs = read_text_files(files)
    random.Random(seed).shuffle(docs)
    n_shards = (len(docs) + docs_per_shard - 1) // docs_per_shard
    if n_shards < 2:
        raise UserError(f"only {len(docs)} documents found under {source_dir}: need more than {docs_per_shard} "
                        f"for a train and a val shard; pass a bigger source dir or a smaller docs_per_shard")
    for index in range(n_shards):
        shard_docs = docs[index * docs_per_shard:(index + 1) * docs_per_shard]
        write_shard(shard_path(data_dir, index), shard_docs, docs_per_row_group)
    return list_shards(data_dir)


def write_shard(path, docs, docs_per_row_group):
    """Atomically write one parquet shard; row_group_size fixes how many docs each row group holds."""
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    tmp_path = path + ".tmp"
    pq.write_table(table, tmp_path, row_group_size=docs_per_row_group, compression="zstd")
    os.replace(tmp_path, path)


# ---------------------------------------------------------------------------
# Downloading

def download_file(url, path, retries=5, retry_wait=2.0, timeout=60):
    """Fetch url into path via a temp file; retried with backoff; checked to be parquet before the rename."""
    if os.path.exists(path):
        return path
    tmp_path = path + ".tmp"
    last_error = None
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp_path, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            pq.ParquetFile(tmp_path)  # a truncated or HTML error page fails here, not later in training
            os.replace(tmp_path, path)
            return path
        except Exception as e:  # network errors, HTTP errors, bad files: all worth a retry
            last_error = e
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            if attempt + 1 < retries:
                time.sleep(retry_wait * (2 ** attempt))
    raise UserError(f"download of {url} failed after {retries} tries ({last_error}): check --base-url and the network")


def download_shards(num_shards, data_dir=None, base_url=DEFAULT_BASE_URL, workers=4, retries=5, retry_wait=2.0,
                    overwrite=False):
    """Download shards 0..num_shards-1 (skipping ones already present); the last one becomes val. Shards of
    another corpus in data_dir are an error, unless overwrite (claim_data_dir)."""
    if num_shards < 2:
        raise UserError(f"-n {num_shards} is too few: need at least 2 shards (train + val)")
    data_dir = data_dir or get_data_dir()
    base_url = base_url.rstrip("/")
    claim_data_dir(data_dir, download_record(base_url), overwrite)

    def fetch(index):
        name = SHARD_NAME.format(index=index)
        return download_file(f"{base_url}/{name}", os.path.join(data_dir, name), retries, retry_wait)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fetch, range(num_shards)))
    except UserError:
        if not shard_names(data_dir):
            os.remove(os.path.join(data_dir, CORPUS_FILE))  # nothing arrived: the directory is as it was
        raise


def main():
    parser = argparse.ArgumentParser(description="Write or download pretraining data shards into <base>/base_data", allow_abbrev=False)
    parser.add_argument("--default-corpus", action="store_true", help="write the Python stdlib sources as shards")
    parser.add_argument("-n", "--num-shards", type=int, default=0, help="number of FineWeb-edu shards to download")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="URL prefix of shard_XXXXX.parquet files")
    parser.add_argument("--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--data-dir", default=None, help="default: <base>/base_data")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the shards of another corpus in the data dir before writing these")
    parser.add_argument("--source-dir", default=None,
                        help="with --default-corpus: take the .py files under this directory instead of the stdlib "
                             "(e.g. a site-packages directory, for a larger code corpus)")
    args = parser.parse_args()
    if args.default_corpus == bool(args.num_shards):
        raise UserError("pass exactly one of --default-corpus or -n N")
    data_dir = args.data_dir or get_data_dir()
    t0 = time.time()
    if args.default_corpus:
        shards = write_default_corpus(data_dir, source_dir=args.source_dir, overwrite=args.overwrite)
    else:
        shards = download_shards(args.num_shards, data_dir, args.base_url, args.workers, overwrite=args.overwrite)
    print(f"{len(shards)} shards in {data_dir} ({time.time() - t0:.1f}s); val shard: {os.path.basename(shards[-1])}")


if __name__ == "__main__":
    run_main(main)
