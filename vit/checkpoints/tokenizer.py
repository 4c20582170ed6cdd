"""Text -> token ids, with the checkpoint's own vocabulary read by the library that defines it (never our own BPE).

- ``tokenizer.json`` (Hugging Face CLIP and most hub repositories): Hugging Face ``tokenizers``;
- ``vocab.json`` + ``merges.txt`` (older CLIP repositories): the same library, assembled as CLIP's fast tokenizer is
  (NFC, whitespace collapsed, lower case; CLIP's split pattern, byte-level BPE with ``</w>``; start/end tokens);
- ``spiece.model`` (SigLIP): ``sentencepiece``, after SigLIP's canonicalisation (lower case, punctuation removed,
  whitespace collapsed), with the end token appended;
- a bare OpenAI / OpenCLIP state dict: the BPE vocabulary inside ``open_clip_torch``, through its own tokenizer.

Every tokenizer is a callable ``texts -> LongTensor (B, context_length)``: text longer than the context is cut and
its end token kept as the last id, shorter text padded, as the defining library does. These libraries are the
``text`` extra (``pip install "vit[text]"``); image-only use needs none of them.
"""
from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path
from typing import Any, Sequence

import torch

from ._common import CheckpointError

EXTRA = 'pip install "open-clip-torch>=3.0" "tokenizers>=0.15" "sentencepiece>=0.2"  (or pip install -e ".[text]")'
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model", "tokenizer_config.json",
                   "special_tokens_map.json")
# CLIP's pre-tokenizer pattern (contractions, letters, single digits, other symbols), as its fast tokenizer uses it
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(f"text tokenizers need the {module!r} package, which is not installed: {EXTRA}") from error


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"tokenizer: expected a string or a list of strings, got {type(bad[0]).__name__}")
    return texts


def _pad(rows: list[list[int]], context_length: int, pad_id: int, end_id: int | None) -> torch.Tensor:
    """Rows of ids -> (B, context_length): too long ones cut with the end token kept last, short ones padded."""
    out = torch.full((len(rows), context_length), pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        if len(ids) > context_length:
            ids = ids[:context_length]
            if end_id is not None:
                ids[-1] = end_id
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (start/end tokens added by its post-processor), cut and padded to
    ``context_length`` the way transformers' ``tokenizer(texts, padding="max_length", truncation=True)`` does.

    Example:
        >>> tok = HFTokenizer.from_files("path/to/clip-dir", context_length=77)  # doctest: +SKIP
        >>> tok(["a photo of a cat"]).shape  # doctest: +SKIP
        torch.Size([1, 77])
    """

    def __init__(self, tokenizer: Any, context_length: int, pad_id: int, name: str = "tokenizer.json"):
        self.tokenizer, self.context_length, self.pad_id, self.name = tokenizer, context_length, pad_id, name

    @classmethod
    def from_files(cls, directory: str | os.PathLike, context_length: int) -> "HFTokenizer":
        """``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, in ``directory``; the pad token from
        ``tokenizer_config.json`` / ``special_tokens_map.json`` (CLIP's repositories pad with the end token)."""
        tokenizers = _need("tokenizers")
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
            name = str(directory / "tokenizer.json")
        else:
            tokenizer, name = _clip_bpe(directory), str(directory / "vocab.json")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        pad_token = _special_token(directory, "pad_token") or "<|endoftext|>"
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise CheckpointError(f"{name}: the pad token {pad_token!r} is not in the vocabulary")
        return cls(tokenizer, context_length, pad_id, name)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        context_length = context_length or self.context_length
        # the library's truncation leaves room for the start/end tokens its post-processor adds, as transformers does
        self.tokenizer.enable_truncation(max_length=context_length)
        rows = [encoding.ids for encoding in self.tokenizer.encode_batch(_as_list(texts))]
        return _pad(rows, context_length, self.pad_id, None)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name}, context_length={self.context_length})"


def _special_token(directory: Path, key: str) -> str | None:
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / filename
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get(key)
            except ValueError as error:
                raise CheckpointError(f"{path}: not a readable JSON file ({error})") from error
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return None


def _clip_bpe(directory: Path):
    """CLIP's fast tokenizer assembled from ``tokenizers``' own parts and the files' vocabulary and merges."""
    tokenizers = _need("tokenizers")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
    if missing:
        raise CheckpointError(f"{directory}: no tokenizer.json, and no {' and '.join(missing)} either")
    try:
        bpe = models.BPE.from_file(str(vocab_path), str(merges_path), continuing_subword_prefix="",
                                   end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>")
    except Exception as error:  # noqa: BLE001 — the library's parse errors
        raise CheckpointError(f"{vocab_path} / {merges_path}: not a BPE vocabulary ({error})") from error
    tokenizer = tokenizers.Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    start, end = (_special_token(directory, "bos_token") or "<|startoftext|>",
                  _special_token(directory, "eos_token") or "<|endoftext|>")
    ids = [tokenizer.token_to_id(t) for t in (start, end)]
    if None in ids:
        raise CheckpointError(f"{vocab_path}: the start/end tokens {start!r}, {end!r} are not in the vocabulary")
    tokenizer.post_processor = processors.RobertaProcessing((end, ids[1]), (start, ids[0]),
                                                            add_prefix_space=False, trim_offsets=False)
    return tokenizer


class SentencePieceTokenizer:
    """SigLIP's tokenizer: lower case, punctuation removed, whitespace collapsed (big_vision's canonicalisation),
    ``sentencepiece`` ids, the end token ``</s>`` appended (kept when the text is cut), padded with ``</s>``.

    Example:
        >>> tok = SentencePieceTokenizer("path/to/spiece.model", context_length=64)  # doctest: +SKIP
    """

    def __init__(self, model_file: str | os.PathLike, context_length: int, pad_token: str = "</s>",
                 eos_token: str = "</s>", lower_case: bool = True):
        spm = _need("sentencepiece")
        self.name = str(model_file)
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(self.name)
        except (OSError, RuntimeError) as error:
            raise CheckpointError(f"{model_file}: not a sentencepiece model ({error})") from error
        self.context_length, self.lower_case = context_length, lower_case
        self.pad_id, self.eos_id = self.processor.piece_to_id(pad_token), self.processor.piece_to_id(eos_token)
        unknown = [t for t, i in ((pad_token, self.pad_id), (eos_token, self.eos_id)) if i == self.processor.unk_id()]
        if unknown:
            raise CheckpointError(f"{model_file}: the tokens {unknown} are not in the sentencepiece vocabulary")
        self._punctuation = str.maketrans("", "", string.punctuation)

    def canonicalize(self, text: str) -> str:
        text = text.lower() if self.lower_case else text
        return re.sub(r"\s+", " ", text.translate(self._punctuation)).strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        context_length = context_length or self.context_length
        rows = [self.processor.encode(self.canonicalize(t)) + [self.eos_id] for t in _as_list(texts)]
        return _pad(rows, context_length, self.pad_id, self.eos_id)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name}, context_length={self.context_length})"


class OpenCLIPTokenizer:
    """The BPE vocabulary that ships inside ``open_clip_torch`` (OpenAI's), through open_clip's own tokenizer:
    start 49406, end 49407, pad 0; for OpenAI CLIP and OpenCLIP state dicts, which carry no tokenizer files."""

    def __init__(self, context_length: int = 77):
        _need("open_clip")
        from open_clip.tokenizer import SimpleTokenizer
        self.tokenizer, self.context_length, self.name = SimpleTokenizer(context_length=context_length), \
            context_length, "open_clip bpe_simple_vocab_16e6"

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        return self.tokenizer(_as_list(texts), context_length=context_length or self.context_length)

    def __repr__(self) -> str:
        return f"OpenCLIPTokenizer(context_length={self.context_length})"


def load_tokenizer(source: str | os.PathLike, context_length: int):
    """A tokenizer from a directory holding ``tokenizer.json``, ``vocab.json`` + ``merges.txt`` or
    ``spiece.model``, or from one of those files itself; ``"openclip"`` for open_clip's bundled vocabulary.

    Example:
        >>> load_tokenizer("openclip", 77)(["a photo of a cat"])[0, :7].tolist()
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    if str(source) == "openclip":
        return OpenCLIPTokenizer(context_length)
    path = Path(source)
    if path.is_file():
        if path.name.endswith(".model"):
            return _sentencepiece(path, context_length)
        if path.name in ("tokenizer.json", "vocab.json", "merges.txt"):
            return HFTokenizer.from_files(path.parent, context_length)
        raise CheckpointError(f"{path}: expected tokenizer.json, vocab.json, merges.txt or a sentencepiece .model")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such tokenizer file or directory")
    if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
        return HFTokenizer.from_files(path, context_length)
    if (path / "spiece.model").is_file():
        return _sentencepiece(path / "spiece.model", context_length)
    raise CheckpointError(f"{path}: no tokenizer files (looked for tokenizer.json, vocab.json + merges.txt, "
                          f"spiece.model)")


def find_tokenizer(files: dict[str, Path], context_length: int):
    """The tokenizer of a checkpoint directory's files (name -> path), or None when there are no tokenizer files."""
    if "tokenizer.json" in files or "vocab.json" in files:
        return HFTokenizer.from_files(Path(files.get("tokenizer.json", files.get("vocab.json"))).parent,
                                      context_length)
    if "spiece.model" in files:
        return _sentencepiece(Path(files["spiece.model"]), context_length)
    return None


def _sentencepiece(path: Path, context_length: int) -> "SentencePieceTokenizer":
    """SigLIP's tokenizer with the pad / end tokens its directory's tokenizer config names (``</s>`` both)."""
    return SentencePieceTokenizer(path, context_length, pad_token=_special_token(path.parent, "pad_token") or "</s>",
                                  eos_token=_special_token(path.parent, "eos_token") or "</s>")
