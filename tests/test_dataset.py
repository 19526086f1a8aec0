import functools
import http.server
import os
import shutil
import sysconfig
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.dataset import (CORPUS_FILE, download_shards, iter_docs, list_row_groups, list_shards, list_stdlib_sources,
                              read_text_files, split_shards, write_default_corpus, write_shard)

SMALL = dict(max_files=60, docs_per_shard=20, docs_per_row_group=5)


def read_all_bytes(data_dir):
    return {name: open(os.path.join(data_dir, name), "rb").read() for name in sorted(os.listdir(data_dir))}


def test_default_corpus_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_default_corpus(a, **SMALL)
    write_default_corpus(b, **SMALL)
    assert read_all_bytes(a) == read_all_bytes(b)


def test_default_corpus_layout(tmp_path):
    data_dir = str(tmp_path / "data")
    shards = write_default_corpus(data_dir, **SMALL)
    expected_docs = read_text_files(list_stdlib_sources()[:SMALL["max_files"]])
    n_shards = -(-len(expected_docs) // 20)
    assert n_shards >= 2
    assert [os.path.basename(p) for p in shards] == [f"shard_{i:05d}.parquet" for i in range(n_shards)]
    assert not [n for n in os.listdir(data_dir) if n.endswith(".tmp")]
    for path in shards[:-1]:
        pf = pq.ParquetFile(path)
        assert pf.metadata.num_rows == 20 and pf.num_row_groups == 4
    # The last shard is val, the rest train; together they hold every source file exactly once.
    assert split_shards("val", data_dir) == shards[-1:]
    assert split_shards("train", data_dir) == shards[:-1]
    docs = list(iter_docs("train", data_dir)) + list(iter_docs("val", data_dir))
    assert sorted(docs) == sorted(expected_docs)
    assert list(iter_docs("val", data_dir)) == pq.read_table(shards[-1]).column("text").to_pylist()


def test_stdlib_sources_skip_site_packages():
    files = list_stdlib_sources()
    assert files == sorted(files) and len(files) > 500
    assert not [f for f in files if "site-packages" in f]
    assert os.path.join(sysconfig.get_paths()["stdlib"], "os.py") in files


def test_default_corpus_is_noop_when_shards_exist(tmp_path):
    data_dir = str(tmp_path / "data")
    first = write_default_corpus(data_dir, **SMALL)
    before = read_all_bytes(data_dir)
    assert write_default_corpus(data_dir, max_files=200, docs_per_shard=50) == first
    assert read_all_bytes(data_dir) == before


def test_row_groups_round_robin_slices_are_disjoint(tiny_data_dir):
    row_groups = list_row_groups("train", tiny_data_dir)
    rank0 = list(iter_docs("train", tiny_data_dir, start=0, step=2))
    rank1 = list(iter_docs("train", tiny_data_dir, start=1, step=2))
    assert len(row_groups) >= 4
    assert rank0 and rank1 and not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(iter_docs("train", tiny_data_dir))


# -- bad input ----------------------------------------------------------------

def test_missing_data_dir(tmp_path):
    with pytest.raises(UserError, match=r"no data shards in .*python -m nanochat.dataset --default-corpus"):
        list_shards(str(tmp_path / "nope"))


def test_empty_data_dir(tmp_path):
    with pytest.raises(UserError, match=r"no data shards in .*--default-corpus"):
        split_shards("train", str(tmp_path))


def test_single_shard_is_not_enough(tmp_path):
    write_shard(str(tmp_path / "shard_00000.parquet"), ["a", "b"], 1)
    with pytest.raises(UserError, match=r"need at least 2 .*train \+ val.*--default-corpus"):
        split_shards("val", str(tmp_path))


REBUILD = (r": rebuild the default corpus with `rm -r {d} && python -m nanochat\.dataset --default-corpus` "
           r"\(downloaded shards: delete this file and re-run `python -m nanochat\.dataset -n N`\)$")


def test_shard_without_text_column(tmp_path):
    for i in range(2):
        pq.write_table(pa.table({"content": ["x", "y"]}), str(tmp_path / f"shard_{i:05d}.parquet"))
    with pytest.raises(UserError, match=rf"^shard {tmp_path}/shard_00000.parquet has no `text` column "
                                        rf"\(columns: \['content'\]\)" + REBUILD.format(d=tmp_path)):
        list(iter_docs("train", str(tmp_path)))


@pytest.mark.parametrize("index, split", [(0, "train"), (1, "train"), (2, "val")])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_shard_is_one_error_naming_it(tmp_path, index, split, damage):
    data_dir = str(tmp_path / "data")
    shards = write_default_corpus(data_dir, **SMALL)
    assert len(shards) == 3
    path = shards[index]
    if damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"<html>not a shard</html>")
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2 if damage == "truncated" else 0)
    with pytest.raises(UserError, match=rf"^shard {path} is not a readable parquet file \(.+\)" +
                       REBUILD.format(d=data_dir)):
        list(iter_docs(split, data_dir))


def test_damaged_row_group_is_one_error_naming_the_shard(tmp_path):
    data_dir = str(tmp_path / "data")
    path = write_default_corpus(data_dir, **SMALL)[1]
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(open(path, "rb").read())
    for i in range(column.data_page_offset + 20, column.data_page_offset + 200):  # footer intact, a page broken
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(UserError, match=rf"^shard {path} cannot be read at row group 1 \(.+\)" +
                       REBUILD.format(d=data_dir)):
        list(iter_docs("train", data_dir))


# -- download -------------------------------------------------------------------

@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; stopped after the test."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_download_shards(local_server, tmp_path):
    served, url = local_server
    for i in range(3):
        write_shard(str(served / f"shard_{i:05d}.parquet"), [f"doc {i} {j}" for j in range(7)], 3)
    dest = str(tmp_path / "dest")
    paths = download_shards(3, dest, base_url=url, workers=2, retries=2, retry_wait=0)
    assert [os.path.basename(p) for p in paths] == [f"shard_{i:05d}.parquet" for i in range(3)]
    for p in paths:
        assert open(p, "rb").read() == open(served / os.path.basename(p), "rb").read()
    assert sorted(os.listdir(dest)) == [CORPUS_FILE] + [os.path.basename(p) for p in paths]  # no temp files left
    assert list(iter_docs("val", dest)) == [f"doc 2 {j}" for j in range(7)]
    # Present shards are not fetched again (the server no longer has them).
    for p in served.iterdir():
        p.unlink()
    assert download_shards(3, dest, base_url=url, retries=1, retry_wait=0) == paths


def test_another_corpus_is_not_mixed_in_without_overwrite(local_server, tmp_path):
    """Downloaded shards next to the default corpus's would form one train split of two corpora."""
    served, url = local_server
    for i in range(3):
        write_shard(str(served / f"shard_{i:05d}.parquet"), [f"doc {i} {j}" for j in range(7)], 3)
    data_dir = str(tmp_path / "data")
    write_default_corpus(data_dir, **SMALL)
    before = read_all_bytes(data_dir)
    with pytest.raises(UserError, match=rf"^{data_dir} holds \d+ shards of the \.py files of .* \(--default-corpus\); "
                                        rf"adding shards of the corpus at {url} would mix two corpora: "
                                        r"pass --overwrite to delete them first"):
        download_shards(3, data_dir, base_url=url, retries=1, retry_wait=0)
    assert read_all_bytes(data_dir) == before
    paths = download_shards(3, data_dir, base_url=url, retries=1, retry_wait=0, overwrite=True)
    assert list_shards(data_dir) == paths and list(iter_docs("val", data_dir)) == [f"doc 2 {j}" for j in range(7)]
    with pytest.raises(UserError, match=rf"holds 3 shards of the corpus at {url}; adding shards of the \.py"):
        write_default_corpus(data_dir, **SMALL)
    os.remove(os.path.join(data_dir, CORPUS_FILE))  # shards whose corpus is not recorded count as another one
    with pytest.raises(UserError, match="holds 3 shards of a corpus it does not record"):
        download_shards(3, data_dir, base_url=url, retries=1, retry_wait=0)


def test_download_missing_shard_is_user_error(local_server, tmp_path):
    _, url = local_server
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match=r"failed after 2 tries.*--base-url"):
        download_shards(2, str(dest), base_url=url, workers=1, retries=2, retry_wait=0)
    assert not [n for n in os.listdir(dest) if n.endswith(".tmp")]


def test_download_non_parquet_is_user_error(local_server, tmp_path):
    served, url = local_server
    for i in range(2):
        (served / f"shard_{i:05d}.parquet").write_text("<html>not found</html>")
    with pytest.raises(UserError, match="failed after 1 tries"):
        download_shards(2, str(tmp_path / "dest"), base_url=url, retries=1, retry_wait=0)
    assert os.listdir(tmp_path / "dest") == []


def test_download_too_few_shards_is_user_error(tmp_path):
    with pytest.raises(UserError, match="at least 2"):
        download_shards(1, str(tmp_path))


def test_only_the_datasets_shard_names_count_as_shards(tmp_path, tiny_data_dir):
    shutil.copytree(tiny_data_dir, tmp_path / "data")
    shards = list_shards(str(tmp_path / "data"))
    for stray in ("notes.parquet", "zz_backup.parquet", "shard_00001.parquet.tmp", "shard_7.parquet"):
        write_shard(str(tmp_path / "data" / stray), ["not training text"], 1)
    assert list_shards(str(tmp_path / "data")) == shards
    assert split_shards("val", str(tmp_path / "data")) == shards[-1:]
