"""The tokenizer rebuilt from GGUF metadata, and ``tokenizer.json`` loading."""

from __future__ import annotations

import gguf
import pytest
from tokenizers import pre_tokenizers

from jaxprune.data import read_wikitext
from jaxprune.tokenizer import load_tokenizer, tokenizer_from_gguf


def tiny_fields(**overrides) -> dict:
    """Metadata of a tiny byte-level BPE: 3 control tokens, 256 bytes, merges "Ġt" and "Ġth"."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<s>", "</s>", *alphabet, "Ġt", "Ġth", "<user>"]
    types = (
        [int(gguf.TokenType.CONTROL)] * 3
        + [int(gguf.TokenType.NORMAL)] * (len(tokens) - 4)
        + [int(gguf.TokenType.USER_DEFINED)]
    )
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    return fields | overrides


def test_tiny_tokenizer_merges_digits_and_specials():
    tok = tokenizer_from_gguf(tiny_fields())
    vocab = tok.get_vocab()
    enc = tok.encode("the 42<s>")
    # "the" is the first word: no prefix space, so "t" "h" "e" stay bytes; " th" merges twice;
    # digits are split one by one; the control token is matched whole.
    assert enc.tokens == ["t", "h", "e", "Ġ", "4", "2", "<s>"]
    assert tok.encode(" the").tokens == ["Ġth", "e"]
    assert tok.encode(" the").ids == [vocab["Ġth"], vocab["e"]]
    assert tok.encode("<user>").ids == [len(vocab) - 1]
    assert tok.decode(tok.encode("héllo\n wörld 2024").ids) == "héllo\n wörld 2024"


def test_bos_is_added_only_when_the_metadata_says_so():
    assert tokenizer_from_gguf(tiny_fields()).encode("a").ids[0] != 1
    tok = tokenizer_from_gguf(tiny_fields(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("a").ids[0] == 1
    assert tok.encode("a", add_special_tokens=False).ids[0] != 1


def test_reader_and_fields_give_the_same_tokenizer(tmp_path):
    fields = tiny_fields()
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model(fields["tokenizer.ggml.model"])
    w.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_token_merges(fields["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from_reader = tokenizer_from_gguf(gguf.GGUFReader(tmp_path / "t.gguf"))
    from_fields = tokenizer_from_gguf(fields)
    text = "Then 3 th<s>ings"
    assert from_reader.encode(text).ids == from_fields.encode(text).ids
    assert from_reader.get_vocab() == from_fields.get_vocab()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model='llama' is not supported"),
        ({"tokenizer.ggml.pre": "qwen2"}, "tokenizer.ggml.pre='qwen2' is not supported"),
        ({"tokenizer.ggml.merges": ["Ġt"]}, r"merges\[0\]='Ġt' is not of the form"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries for 262 tokens"),
    ],
)
def test_bad_metadata_is_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tokenizer_from_gguf(tiny_fields(**overrides))


def test_missing_key_and_wrong_type():
    fields = tiny_fields()
    del fields["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match=r"has no 'tokenizer.ggml.merges'"):
        tokenizer_from_gguf(fields)
    with pytest.raises(TypeError, match=r"not str; open the file with gguf.GGUFReader"):
        tokenizer_from_gguf("model.gguf")


def test_load_tokenizer_json(tmp_path):
    tok = tokenizer_from_gguf(tiny_fields())
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(" the 7").ids == tok.encode(" the 7").ids
    with pytest.raises(FileNotFoundError, match="no tokenizer file at"):
        load_tokenizer(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not a valid tokenizer.json: not JSON"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match=r"empty\.json is not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "empty.json")


# --- The default model's tokenizer -----------------------------------------------------------


@pytest.fixture(scope="module")
def reader(default_model_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(default_model_path)


@pytest.fixture(scope="module")
def smollm(reader):
    return tokenizer_from_gguf(reader)


@pytest.mark.slow
def test_default_tokenizer_facts(reader, smollm):
    assert smollm.get_vocab_size() == 49152
    assert len(reader.fields["tokenizer.ggml.merges"].data) == 48_900
    assert smollm.id_to_token(1) == "<|im_start|>" and smollm.id_to_token(2) == "<|im_end|>"
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2
    ids = smollm.encode("Hello world 2024").ids
    assert 1 not in ids and 2 not in ids  # no BOS / EOS added
    assert smollm.encode(" 2024").tokens == ["Ġ", "2", "0", "2", "4"]
    assert smollm.encode("Hello world").tokens == ["Hello", "Ġworld"]


@pytest.mark.slow
def test_default_tokenizer_round_trips_all_of_wikitext(smollm):
    text = read_wikitext()
    ids = smollm.encode(text, add_special_tokens=False).ids
    assert len(ids) == 304_978
    assert smollm.decode(ids, skip_special_tokens=False) == text
