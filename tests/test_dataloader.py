import itertools
import json

import pytest
import torch

from nanochat.common import UserError
from nanochat.dataloader import DistributedDataLoader
from nanochat.dataset import iter_docs

B, T = 2, 64


def make_loader(tokenizer, data_dir, split="train", rank=0, world_size=1, state=None, docs_per_encode=5):
    # A small docs_per_encode makes refills (and so resume points) fall in many different places.
    return DistributedDataLoader(tokenizer, B, T, split, "cpu", rank=rank, world_size=world_size, state=state,
                                 data_dir=data_dir, docs_per_encode=docs_per_encode, num_threads=2)


def windows(loader, n_batches):
    """The (B, T+1) token windows of the next n batches, rebuilt from x and y, as one flat list."""
    out = []
    for _ in range(n_batches):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        out.extend(torch.cat([x, y[:, -1:]], dim=1).flatten().tolist())
    return out


def expected_stream(tokenizer, data_dir, split, rank, world_size, n_tokens):
    """What the loader should produce: this rank's docs, each BOS + tokens, concatenated, repeated per epoch."""
    docs = list(iter_docs(split, data_dir, start=rank, step=world_size))
    bos = tokenizer.get_bos_token_id()
    epoch = [t for ids in tokenizer.encode(docs, prepend=bos) for t in ids]
    return list(itertools.islice(itertools.cycle(epoch), n_tokens)), len(epoch)


def test_stream_is_bos_prefixed_docs(tiny_tokenizer, tiny_data_dir):
    n_batches = 20
    got = windows(make_loader(tiny_tokenizer, tiny_data_dir), n_batches)
    want, _ = expected_stream(tiny_tokenizer, tiny_data_dir, "train", 0, 1, len(got))
    assert got == want
    assert got[0] == tiny_tokenizer.get_bos_token_id()


def test_val_loops_over_epochs(tiny_tokenizer, tiny_data_dir):
    _, epoch_len = expected_stream(tiny_tokenizer, tiny_data_dir, "val", 0, 1, 0)
    n_batches = 2 * epoch_len // (B * (T + 1)) + 2  # more than two epochs
    loader = make_loader(tiny_tokenizer, tiny_data_dir, "val")
    got = windows(loader, n_batches)
    want, _ = expected_stream(tiny_tokenizer, tiny_data_dir, "val", 0, 1, len(got))
    assert got == want
    assert loader.state_dict()["epoch"] == 2


def test_deterministic(tiny_tokenizer, tiny_data_dir):
    a = windows(make_loader(tiny_tokenizer, tiny_data_dir), 10)
    b = windows(make_loader(tiny_tokenizer, tiny_data_dir, docs_per_encode=64), 10)
    assert a == b


def test_ranks_read_disjoint_documents(tiny_tokenizer, tiny_data_dir):
    docs0 = list(iter_docs("train", tiny_data_dir, start=0, step=2))
    docs1 = list(iter_docs("train", tiny_data_dir, start=1, step=2))
    assert docs0 and docs1 and not set(docs0) & set(docs1)
    streams = []
    for rank in range(2):
        got = windows(make_loader(tiny_tokenizer, tiny_data_dir, rank=rank, world_size=2), 10)
        want, _ = expected_stream(tiny_tokenizer, tiny_data_dir, "train", rank, 2, len(got))
        assert got == want
        streams.append(got)
    assert streams[0] != streams[1]


def check_resume(tokenizer, data_dir, split, rank, world_size, skip_batches, n_batches=20):
    """States taken at several points must make fresh loaders continue with exactly the reference's batches."""
    reference = make_loader(tokenizer, data_dir, split, rank, world_size, docs_per_encode=64)
    windows(reference, skip_batches)
    states, batches = [], []
    for _ in range(n_batches):
        states.append(json.loads(json.dumps(reference.state_dict())))  # must survive JSON
        batches.append(windows(reference, 1))
    for k in range(0, n_batches - 4, 3):
        resumed = make_loader(tokenizer, data_dir, split, rank, world_size, state=states[k], docs_per_encode=3)
        assert windows(resumed, 4) == sum(batches[k:k + 4], [])
    return [s["epoch"] for s in states]


@pytest.mark.parametrize("split,rank,world_size", [("train", 0, 1), ("train", 1, 2), ("val", 0, 1)])
def test_exact_resume(tiny_tokenizer, tiny_data_dir, split, rank, world_size):
    check_resume(tiny_tokenizer, tiny_data_dir, split, rank, world_size, skip_batches=5)


def test_exact_resume_across_epoch_boundary(tiny_tokenizer, tiny_data_dir):
    _, epoch_len = expected_stream(tiny_tokenizer, tiny_data_dir, "val", 0, 1, 0)
    epochs = check_resume(tiny_tokenizer, tiny_data_dir, "val", 0, 1, skip_batches=epoch_len // (B * (T + 1)) - 10)
    assert epochs[0] == 0 and epochs[-1] == 1


def test_state_for_other_world_size_is_user_error(tiny_tokenizer, tiny_data_dir):
    state = make_loader(tiny_tokenizer, tiny_data_dir).state_dict()
    with pytest.raises(UserError, match="same number of GPUs"):
        make_loader(tiny_tokenizer, tiny_data_dir, rank=0, world_size=2, state=state)


def test_more_ranks_than_row_groups_is_user_error(tiny_tokenizer, tiny_data_dir):
    with pytest.raises(UserError, match="fewer than 64 ranks"):
        make_loader(tiny_tokenizer, tiny_data_dir, "val", rank=0, world_size=64)


def test_no_data_is_user_error(tiny_tokenizer, tmp_path):
    with pytest.raises(UserError, match="no data shards in"):
        make_loader(tiny_tokenizer, str(tmp_path))
