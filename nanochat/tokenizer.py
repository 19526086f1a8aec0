"""BPE tokenizer: trained with rustbpe, encoded/decoded with tiktoken.

Files in a tokenizer directory:
  mergeable_ranks.tiktoken  one "<base64 token bytes> <rank>" line per ordinary token (tiktoken's own format)
  tokenizer.json            split pattern and special tokens {name: id}
  token_bytes.pt            int32 tensor [vocab]: UTF-8 byte length of each token, 0 for special tokens
"""

import base64
import hashlib
import json
import os

import tiktoken
import torch

from nanochat.common import UserError, get_base_dir

# GPT-4 style split pattern, but numbers split into groups of at most 2 digits (not 3):
# with small vocabularies this wastes fewer tokens on 3-digit numbers.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# Special tokens take the last ids of the vocabulary. Only <|bos|> is used in pretraining;
# the chat tokens are reserved so a later chat fine-tune does not need a new vocabulary.
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]

RANKS_FILE = "mergeable_ranks.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def compute_token_bytes(mergeable_ranks, special_tokens, vocab_size):
    """Byte length of each token id (used to report bits per byte); special tokens count 0 bytes."""
    token_bytes = torch.zeros(vocab_size, dtype=torch.int32)
    for token, rank in mergeable_ranks.items():
        token_bytes[rank] = len(token)
    for token_id in special_tokens.values():
        token_bytes[token_id] = 0
    return token_bytes


class Tokenizer:
    def __init__(self, mergeable_ranks, pattern, special_tokens, token_bytes=None):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.special_tokens = special_tokens
        self.enc = tiktoken.Encoding(
            name="nanochat-sparse",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
        )
        if token_bytes is None:
            token_bytes = compute_token_bytes(mergeable_ranks, special_tokens, self.enc.n_vocab)
        self.token_bytes = token_bytes
        self.bos_token_id = special_tokens["<|bos|>"]

    @classmethod
    def train_from_iterator(cls, text_iter, vocab_size):
        """Train a BPE vocabulary of vocab_size tokens in total (special tokens included)."""
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise UserError(f"vocab size {vocab_size} is too small: use --vocab-size {min_size} or more")
        n_ordinary = vocab_size - len(SPECIAL_TOKENS)
        import rustbpe  # only training needs it
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iter, n_ordinary, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        # rustbpe stops early when the text has no pairs left to merge; ids must stay contiguous.
        n_ordinary = len(mergeable_ranks)
        special_tokens = {name: n_ordinary + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(mergeable_ranks, trainer.get_pattern(), special_tokens)

    def _file_bytes(self):
        """The contents of the ranks file and tokenizer.json, as save() writes them."""
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                 for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        meta = {"pattern": self.pattern, "special_tokens": self.special_tokens}
        return "".join(lines).encode("ascii"), json.dumps(meta, indent=1).encode()

    def identity(self):
        """{"vocab_size", "sha256"}: what a checkpoint records of the tokenizer it was trained with. The hash
        covers the merges, the split pattern and the special tokens (token_bytes follows from them)."""
        ranks, meta = self._file_bytes()
        return {"vocab_size": self.get_vocab_size(), "sha256": hashlib.sha256(ranks + b"\0" + meta).hexdigest()}

    def save(self, directory):
        """Write the three tokenizer files; each goes to a temp name first so readers never see half a file."""
        os.makedirs(directory, exist_ok=True)
        ranks, meta = self._file_bytes()
        _write_atomic(os.path.join(directory, RANKS_FILE), lambda f: f.write(ranks))
        _write_atomic(os.path.join(directory, META_FILE), lambda f: f.write(meta))
        _write_atomic(os.path.join(directory, TOKEN_BYTES_FILE), lambda f: torch.save(self.token_bytes, f))

    @classmethod
    def from_directory(cls, directory, vocab_size=None):
        """vocab_size: the size the caller needs, for the rebuild command in errors (None: not known)."""
        paths = [os.path.join(directory, name) for name in (RANKS_FILE, META_FILE, TOKEN_BYTES_FILE)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UserError(f"no tokenizer in {directory} (missing {os.path.basename(missing[0])}): "
                            f"{rebuild_hint(vocab_size)}")
        path = paths[0]
        try:
            mergeable_ranks = {}
            with open(path, "rb") as f:
                data = f.read()
            if data and not data.endswith(b"\n"):
                raise ValueError("it ends mid-line: truncated")
            for line in data.splitlines():
                if line.strip():
                    token_b64, rank = line.split()
                    mergeable_ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            # tiktoken panics (a Rust panic, no Python exception) on duplicate or missing ranks
            if sorted(mergeable_ranks.values()) != list(range(len(mergeable_ranks))):
                raise ValueError(f"its {len(mergeable_ranks)} ranks are not 0..{len(mergeable_ranks) - 1}, each once")
            path = paths[1]
            with open(path) as f:
                meta = json.load(f)
            pattern, special_tokens = meta["pattern"], meta["special_tokens"]
            path = paths[2]
            token_bytes = torch.load(path, weights_only=True)
            path = directory
            return cls(mergeable_ranks, pattern, special_tokens, token_bytes)
        except Exception as e:  # truncated, garbage, wrong keys, or files from different tokenizers
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
            raise UserError(f"tokenizer file {path} is damaged ({why}): {rebuild_hint(vocab_size)}")

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def get_special_tokens(self):
        return set(self.special_tokens)

    def encode_special(self, name):
        return self.special_tokens[name]

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a str -> list[int], or a list[str] -> list[list[int]] (in parallel).

        Special-token strings inside the text are encoded as ordinary text (documents cannot inject them).
        prepend / append: a special token name or id to add to each sequence, e.g. prepend=tok.get_bos_token_id().
        """
        prepend_id = self._token_id(prepend)
        append_id = self._token_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend_id is not None:
                ids.insert(0, prepend_id)
            if append_id is not None:
                ids.append(append_id)
            return ids
        if isinstance(text, list):
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            if prepend_id is not None:
                batch = [[prepend_id] + ids for ids in batch]
            if append_id is not None:
                for ids in batch:
                    ids.append(append_id)
            return batch
        raise TypeError(f"encode expects str or list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def id_to_token(self, token_id):
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def _token_id(self, token):
        if token is None or isinstance(token, int):
            return token
        return self.special_tokens[token]


def _write_atomic(path, write_fn):
    tmp_path = path + ".tmp"
    with open(tmp_path, "wb") as f:
        write_fn(f)
    os.replace(tmp_path, path)


def rebuild_hint(vocab_size=None):
    if vocab_size:
        return f"run `python -m scripts.tok_train --vocab-size {vocab_size}`"
    return "run `python -m scripts.tok_train` with --vocab-size N, the size the model trains with (make train uses 4096)"


def check_replace(directory, vocab_size, overwrite, checkpoints_dir=None):
    """Before training a tokenizer of vocab_size into directory: a tokenizer of another size there is what
    checkpoints (and make train, which trains one only when none exists) load, so replacing it needs overwrite.
    checkpoints_dir: <base>/base_checkpoints, whose tags trained with the old tokenizer the error names."""
    if overwrite or not os.path.isfile(os.path.join(directory, META_FILE)):
        return
    try:
        have = Tokenizer.from_directory(directory).identity()
    except UserError:
        return  # a damaged tokenizer serves nobody: replacing it loses nothing
    if have["vocab_size"] == vocab_size:
        return
    users = tags_trained_with(checkpoints_dir, have["sha256"]) if checkpoints_dir else []
    used = f"; checkpoints trained with it: {', '.join(users)}" if users else ""
    raise UserError(f"{directory} holds a tokenizer of vocab size {have['vocab_size']}{used}; this one would have "
                    f"{vocab_size}: pass --overwrite to replace it (the model tags trained with the old one then no "
                    f"longer load), or set NANOCHAT_BASE_DIR to another directory for the new one (data included)")


def tags_trained_with(checkpoints_dir, sha256):
    """The model tags under checkpoints_dir whose newest checkpoint meta records a tokenizer of this sha256."""
    tags = []
    for tag in sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []:
        metas = sorted(n for n in os.listdir(os.path.join(checkpoints_dir, tag)) if n.startswith("meta_")) \
            if os.path.isdir(os.path.join(checkpoints_dir, tag)) else []
        try:
            with open(os.path.join(checkpoints_dir, tag, metas[-1])) as f:
                recorded = json.load(f).get("tokenizer") or {}
        except (IndexError, OSError, ValueError, AttributeError):
            continue
        if isinstance(recorded, dict) and recorded.get("sha256") == sha256:
            tags.append(tag)
    return tags


def get_tokenizer(directory=None, need=None):
    """The tokenizer trained by scripts/tok_train.py (in <base>/tokenizer unless a directory is given).
    need: {"vocab_size", "sha256" (None: not recorded), "what"}, from nanochat.checkpoint.tokenizer_need:
    a tokenizer other than the one a checkpoint was trained with is an error naming the one it needs."""
    directory = directory or get_tokenizer_dir()
    tokenizer = Tokenizer.from_directory(directory, need and need["vocab_size"])
    if need:
        have = tokenizer.identity()
        if have["vocab_size"] != need["vocab_size"] or need["sha256"] not in (None, have["sha256"]):
            same = " (same size, other merges: trained on other data or other --max-chars/--doc-cap)" \
                if have["vocab_size"] == need["vocab_size"] else ""
            raise UserError(f"{need['what']} was trained with a tokenizer of vocab size {need['vocab_size']}, but "
                            f"{directory} holds one of vocab size {have['vocab_size']}{same}: "
                            f"{rebuild_hint(need['vocab_size'])} on the data the model was trained on")
    return tokenizer


def get_token_bytes(device="cpu", directory=None):
    """int32 tensor [vocab] of token byte lengths, for bits-per-byte evaluation."""
    directory = directory or get_tokenizer_dir()
    path = os.path.join(directory, TOKEN_BYTES_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no tokenizer in {directory} (missing {TOKEN_BYTES_FILE}): {rebuild_hint()}")
    return torch.load(path, weights_only=True).to(device)
