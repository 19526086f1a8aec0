"""Token batches for pretraining: documents -> BOS-prefixed token stream -> (B, T+1) windows -> x, y.

Each rank reads its own row groups (round-robin over the split's row groups in order), so ranks see
disjoint documents. The stream loops over epochs forever, for train and val alike.

Resuming: state_dict() names the first document that still has unconsumed tokens (epoch, row group,
doc) and how many of its tokens were consumed. A loader built with state=that dict re-tokenizes from
there and skips those tokens; tokenization of a document does not depend on its neighbours, so the
resumed stream is token-for-token the same as the uninterrupted one.
"""

import os
from collections import deque

import torch

from nanochat.common import UserError
from nanochat.dataset import list_row_groups, open_shard, read_texts


class DistributedDataLoader:
    def __init__(self, tokenizer, B, T, split, device, rank=0, world_size=1, state=None, data_dir=None,
                 docs_per_encode=256, num_threads=None):
        self.tokenizer = tokenizer
        self.B, self.T = B, T
        self.split = split
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.bos = tokenizer.get_bos_token_id()
        self.docs_per_encode = docs_per_encode  # documents per tokenizer call: big enough to use all threads
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        all_row_groups = list_row_groups(split, data_dir)
        if len(all_row_groups) < world_size:
            raise UserError(f"the {split} split has {len(all_row_groups)} row groups, fewer than {world_size} ranks: "
                            f"use fewer GPUs or shards with more (smaller) row groups")
        self.row_groups = all_row_groups[rank::world_size]  # this rank's slice: [(shard path, row group), ...]
        self._parquet_files = {}
        # Read position: the next document to tokenize.
        self._epoch, self._rg_pos, self._doc_pos = 0, 0, 0
        self._rg_docs = None  # texts of row group _rg_pos, read lazily
        # Tokenized but not yet consumed: deque of ((epoch, rg_pos, doc_pos), tokens); _head_offset tokens
        # of the first entry are already consumed.
        self._buffer = deque()
        self._head_offset = 0
        self._n_buffered = 0
        if state is not None:
            self._load_state(state)

    # -- public -------------------------------------------------------------

    def next_batch(self):
        """(x, y): int64 tensors [B, T] on the device; y is x shifted by one token."""
        n = self.B * (self.T + 1)
        windows = torch.tensor(self._take(n), dtype=torch.long).view(self.B, self.T + 1)
        if self.device.type == "cuda":
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self):
        """Small JSON-serializable position; DistributedDataLoader(..., state=it) continues exactly from here."""
        if self._buffer:
            (epoch, rg_pos, doc_pos), _ = self._buffer[0]
        else:
            epoch, rg_pos, doc_pos = self._epoch, self._rg_pos, self._doc_pos
        return {"split": self.split, "rank": self.rank, "world_size": self.world_size,
                "epoch": epoch, "row_group": rg_pos, "doc": doc_pos, "token_offset": self._head_offset}

    # -- internals ----------------------------------------------------------

    def _load_state(self, state):
        if (state["split"], state["rank"], state["world_size"]) != (self.split, self.rank, self.world_size):
            raise UserError(f"data loader state is for split {state['split']} rank {state['rank']} of "
                            f"{state['world_size']}, not {self.split} rank {self.rank} of {self.world_size}: "
                            f"resume with the same number of GPUs")
        self._epoch, self._rg_pos, self._doc_pos = state["epoch"], state["row_group"], state["doc"]
        if state["token_offset"]:
            self._refill()
            self._head_offset = state["token_offset"]
            self._n_buffered -= state["token_offset"]

    def _take(self, n):
        """Pop the next n tokens of the stream as a list."""
        while self._n_buffered < n:
            self._refill()
        out = []
        while len(out) < n:
            _, tokens = self._buffer[0]
            piece = tokens[self._head_offset:self._head_offset + n - len(out)]
            out.extend(piece)
            self._head_offset += len(piece)
            if self._head_offset == len(tokens):
                self._buffer.popleft()
                self._head_offset = 0
        self._n_buffered -= n
        return out

    def _refill(self):
        """Tokenize the next docs_per_encode documents (BOS first in each) onto the buffer."""
        cursors, texts = self._read_docs(self.docs_per_encode)
        for cursor, tokens in zip(cursors, self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.num_threads)):
            self._buffer.append((cursor, tokens))
            self._n_buffered += len(tokens)

    def _read_docs(self, n):
        """The next n documents with their cursors, advancing the read position (wrapping into new epochs)."""
        cursors, texts = [], []
        empty_row_groups = 0
        while len(texts) < n:
            if self._rg_docs is None:
                path, row_group = self.row_groups[self._rg_pos]
                self._rg_docs = read_texts(self._parquet_file(path), path, row_group)
            take = self._rg_docs[self._doc_pos:self._doc_pos + n - len(texts)]
            cursors.extend((self._epoch, self._rg_pos, self._doc_pos + i) for i in range(len(take)))
            texts.extend(take)
            self._doc_pos += len(take)
            if self._doc_pos >= len(self._rg_docs):
                empty_row_groups = 0 if take else empty_row_groups + 1
                if empty_row_groups > len(self.row_groups):
                    raise UserError(f"rank {self.rank} found no documents in its {self.split} row groups: "
                                    f"check the data shards")
                self._rg_docs, self._doc_pos = None, 0
                self._rg_pos += 1
                if self._rg_pos == len(self.row_groups):
                    self._rg_pos, self._epoch = 0, self._epoch + 1
        return cursors, texts

    def _parquet_file(self, path):
        if path not in self._parquet_files:
            self._parquet_files[path] = open_shard(path)
        return self._parquet_files[path]
