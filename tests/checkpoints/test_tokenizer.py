"""Tokenizers read the checkpoint's own files with the library that defines them, and give the defining library's ids:
open_clip's tokenizer, transformers' CLIPTokenizerFast (from tokenizer.json and from vocab.json + merges.txt) and
transformers' SiglipTokenizer (sentencepiece). Every file is built locally from what open_clip ships or trained here."""
from __future__ import annotations

import builtins
import io
import json

import pytest
import torch

from vit.checkpoints import CheckpointError
from vit.checkpoints.tokenizer import (HFTokenizer, OpenCLIPTokenizer, SentencePieceTokenizer, find_tokenizer,
                                       load_tokenizer)

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
from open_clip.tokenizer import SimpleTokenizer

# ASCII, accents, CJK, emoji, extra whitespace, longer than any context, empty, punctuation and digits
TEXTS = ["a photo of a cat", "Café crème à Zürich", "东京的猫と犬", "a dog 🐶🎉!", "  lots   of\t\nspace  ",
         "word " * 100, "", "don't STOP—it's 3.14!"]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """vocab.json + merges.txt from the BPE vocabulary inside open_clip (OpenAI's), in Hugging Face's names, and the
    tokenizer.json transformers writes from them."""
    root = tmp_path_factory.mktemp("clip_tokenizer")
    simple = SimpleTokenizer()
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (root / "bpe").mkdir()
    (root / "bpe" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (root / "bpe" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                             encoding="utf-8")
    fast = transformers.CLIPTokenizerFast.from_pretrained(root / "bpe")
    fast.save_pretrained(root / "fast")
    assert (root / "fast" / "tokenizer.json").is_file()
    return root, fast


@pytest.mark.parametrize("layout", ["fast", "bpe"], ids=["tokenizer.json", "vocab+merges"])
@pytest.mark.parametrize("context_length", [77, 16])
def test_hf_clip_tokenizer_matches_clip_tokenizer_fast(clip_files, layout, context_length):
    root, fast = clip_files
    expected = fast(TEXTS, padding="max_length", max_length=context_length, truncation=True,
                    return_tensors="pt").input_ids
    ours = load_tokenizer(root / layout, context_length)
    assert isinstance(ours, HFTokenizer)
    got = ours(TEXTS)
    assert got.dtype == torch.long and got.shape == (len(TEXTS), context_length)
    assert torch.equal(got, expected)
    assert got[5, -1] == 49407 and got[6, :2].tolist() == [49406, 49407]  # cut with the end kept; empty text


@pytest.mark.parametrize("context_length", [77, 16])
def test_open_clip_vocabulary_matches_open_clip(context_length):
    expected = SimpleTokenizer(context_length=context_length)(TEXTS)
    got = OpenCLIPTokenizer(context_length)(TEXTS)
    assert torch.equal(got, expected) and got[5, -1] == 49407 and got[6, 2] == 0  # open_clip pads with 0
    assert torch.equal(OpenCLIPTokenizer(context_length)("a cat"), SimpleTokenizer()(["a cat"], context_length))


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    sentences = ["a photo of a cat", "a photo of a dog", "the quick brown fox jumps over the lazy dog",
                 "café crème", "东京的猫", "hello world"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=60, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
                                   unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("siglip_tokenizer") / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.mark.parametrize("context_length", [64, 12])
def test_sentencepiece_matches_siglip_tokenizer(spiece, context_length):
    reference = transformers.SiglipTokenizer(str(spiece))
    expected = reference(TEXTS, padding="max_length", max_length=context_length, truncation=True,
                         return_tensors="pt").input_ids
    ours = load_tokenizer(spiece.parent, context_length)
    assert isinstance(ours, SentencePieceTokenizer)
    got = ours(TEXTS)
    assert torch.equal(got, expected)
    assert got[5, -1] == reference.eos_token_id and got[6, 0] == reference.eos_token_id


def test_a_checkpoint_directory_finds_its_tokenizer(clip_files, spiece):
    root, _ = clip_files
    assert isinstance(find_tokenizer({p.name: p for p in (root / "fast").iterdir()}, 77), HFTokenizer)
    assert isinstance(find_tokenizer({"spiece.model": spiece}, 64), SentencePieceTokenizer)
    assert find_tokenizer({}, 77) is None


def test_bad_tokenizer_sources_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such tokenizer file or directory"):
        load_tokenizer(tmp_path / "missing", 77)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path, 77)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no tokenizer.json, and no merges.txt"):
        load_tokenizer(tmp_path, 77)
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="broken.model: not a sentencepiece model"):
        load_tokenizer(tmp_path / "broken.model", 64)
    with pytest.raises(TypeError, match="expected a string or a list of strings"):
        OpenCLIPTokenizer(8)([1, 2])


def test_without_the_text_extra_it_says_what_to_install(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_sentencepiece(name, *args, **kwargs):
        if name == "sentencepiece":
            raise ImportError("No module named 'sentencepiece'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentencepiece)
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(ImportError, match=r"'sentencepiece' package.*pip install -e \"\.\[text\]\""):
        load_tokenizer(tmp_path, 64)
