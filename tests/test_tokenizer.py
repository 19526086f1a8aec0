import pytest

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_token_bytes, get_tokenizer
from scripts.tok_train import iter_training_text

TEXTS = [
    "",
    "hello world",
    "def f(x):\n    return x ** 2  # squared\n\n\n",
    "héllo wörld, naïve café — 你好，世界 🎉🚀 ζωή",
    "tabs\tand\r\nwindows newlines   trailing spaces   ",
    "literal special tokens <|bos|> and <|user_start|> stay plain text",
    "numbers 1234567890 3.14159 -42",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text


def test_vocab_size_and_special_tokens(tiny_tokenizer):
    assert tiny_tokenizer.get_vocab_size() == 512
    special_ids = [tiny_tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
    assert special_ids == list(range(512 - len(SPECIAL_TOKENS), 512))
    assert tiny_tokenizer.get_bos_token_id() == tiny_tokenizer.encode_special("<|bos|>")
    assert tiny_tokenizer.decode([tiny_tokenizer.get_bos_token_id()]) == "<|bos|>"


def test_special_token_text_is_not_a_special_token(tiny_tokenizer):
    ids = tiny_tokenizer.encode("x <|bos|> y")
    assert tiny_tokenizer.get_bos_token_id() not in ids


def test_prepend_and_append(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    ids = tiny_tokenizer.encode("hello", prepend=bos)
    assert ids[0] == bos and ids[1:] == tiny_tokenizer.encode("hello")
    assert tiny_tokenizer.decode(ids) == "<|bos|>hello"
    assert tiny_tokenizer.encode("hello", prepend="<|bos|>") == ids
    assert tiny_tokenizer.encode("hi", append="<|assistant_end|>")[-1] == tiny_tokenizer.encode_special("<|assistant_end|>")


def test_batch_encode_matches_single(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    batch = tiny_tokenizer.encode(TEXTS, prepend=bos, num_threads=2)
    assert batch == [tiny_tokenizer.encode(t, prepend=bos) for t in TEXTS]


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_sum_to_utf8_length(tiny_tokenizer, text):
    token_bytes = tiny_tokenizer.token_bytes
    assert token_bytes.shape == (tiny_tokenizer.get_vocab_size(),)
    ids = tiny_tokenizer.encode(text, prepend=tiny_tokenizer.get_bos_token_id())
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))  # BOS counts 0 bytes


def test_save_and_load(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(str(tmp_path))
    loaded = Tokenizer.from_directory(str(tmp_path))
    assert loaded.get_vocab_size() == tiny_tokenizer.get_vocab_size()
    assert loaded.encode(TEXTS) == tiny_tokenizer.encode(TEXTS)
    assert loaded.token_bytes.equal(tiny_tokenizer.token_bytes)
    assert get_token_bytes(directory=str(tmp_path)).equal(tiny_tokenizer.token_bytes)


def test_get_tokenizer_from_base_dir(tiny_tokenizer):
    assert get_tokenizer().encode(TEXTS) == tiny_tokenizer.encode(TEXTS)


def test_missing_tokenizer_is_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no tokenizer in .*run `python -m scripts.tok_train`"):
        get_tokenizer(str(tmp_path))


def test_too_small_vocab_is_user_error():
    with pytest.raises(UserError, match="--vocab-size"):
        Tokenizer.train_from_iterator(iter(["abc"]), 100)


def test_training_text_respects_caps(tiny_data_dir):
    docs = list(iter_training_text(max_chars=5000, doc_cap=1000, data_dir=tiny_data_dir))
    assert all(len(d) <= 1000 for d in docs)
    assert 5000 <= sum(map(len, docs)) < 6000


@pytest.mark.parametrize("name, garbage", [("tokenizer.json", '{"pattern": "x", "special'),
                                           ("mergeable_ranks.tiktoken", "!!not base64!! 0\n")])
def test_damaged_tokenizer_file_is_one_line(tiny_tokenizer, tmp_path, name, garbage):
    tiny_tokenizer.save(str(tmp_path))
    with open(tmp_path / name, "w") as f:
        f.write(garbage)
    with pytest.raises(UserError, match=rf"^tokenizer file {tmp_path}/{name} is damaged \(\w+Error: .*\): "
                                        r"run `python -m scripts.tok_train` with --vocab-size N"):
        get_tokenizer(str(tmp_path))


def cut_mid_line(data):
    return data[:data.index(b" 300\n") + 3]  # "<token> 30": a duplicate rank to tiktoken


def drop_a_line(data):
    lines = data.splitlines(keepends=True)
    return b"".join(lines[:10] + lines[11:])  # rank 10 missing


@pytest.mark.parametrize("damage, why", [(cut_mid_line, "it ends mid-line: truncated"),
                                         (drop_a_line, r"its \d+ ranks are not 0..\d+, each once")])
def test_ranks_file_cut_or_edited_is_one_line(tiny_tokenizer, tmp_path, damage, why):
    """tiktoken would end these in a Rust panic."""
    tiny_tokenizer.save(str(tmp_path))
    path = tmp_path / "mergeable_ranks.tiktoken"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=rf"^tokenizer file {path} is damaged \(ValueError: {why}\): run `python -m "
                                        r"scripts.tok_train`"):
        get_tokenizer(str(tmp_path))


def test_identity_is_the_saved_files(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(str(tmp_path))
    ident = get_tokenizer(str(tmp_path)).identity()
    assert ident == tiny_tokenizer.identity() and ident["vocab_size"] == 512 and len(ident["sha256"]) == 64


def test_tokenizer_of_another_size_is_replaced_only_with_overwrite(tiny_tokenizer, tiny_data_dir, tmp_path,
                                                                   monkeypatch):
    """tok_train's default vocab size must not silently replace the one a tag's checkpoints load."""
    import json
    import os

    from scripts.tok_train import train_tokenizer
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    out = str(tmp_path / "tokenizer")
    tiny_tokenizer.save(out)
    os.makedirs(tmp_path / "base_checkpoints" / "d4_cpu")
    with open(tmp_path / "base_checkpoints" / "d4_cpu" / "meta_000300.json", "w") as f:
        json.dump({"tokenizer": tiny_tokenizer.identity()}, f)
    with pytest.raises(UserError, match=rf"^{out} holds a tokenizer of vocab size 512; checkpoints trained with it: "
                                        r"d4_cpu; this one would have 300: pass --overwrite to replace it"):
        train_tokenizer(300, max_chars=20_000, doc_cap=10_000, data_dir=tiny_data_dir, out_dir=out)
    assert get_tokenizer(out).identity() == tiny_tokenizer.identity()
    train_tokenizer(512, max_chars=20_000, doc_cap=10_000, data_dir=tiny_data_dir, out_dir=out)  # same size: fine
    train_tokenizer(300, max_chars=20_000, doc_cap=10_000, data_dir=tiny_data_dir, out_dir=out, overwrite=True)
    assert get_tokenizer(out).get_vocab_size() == 300
