"""Offline word-level tokenizers for tests (no Hugging Face hub access needed).

``make_word_tokenizer(words)`` builds a GPT-2-like tokenizer over a closed vocabulary:
every word exists as ``"word"`` and as ``" word"`` (leading space, as GPT-2 writes a word
that follows a space), so ``" Mary"`` is a single token. ``"<|endoftext|>"`` is the BOS,
EOS and padding token (id 0) and ``"<unk>"`` (id 1) catches anything else.

TransformerLens 3.9 replaces a tokenizer that does not prepend BOS by one reloaded from
``tokenizer.name_or_path`` with ``add_bos_token=True`` (which needs the hub or a local
directory), so by default the tokenizer is built with ``add_bos_token=True``: TransformerLens
keeps it as is and sets ``cfg.tokenizer_prepends_bos = True``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS = "<|endoftext|>"
UNK = "<unk>"

# Like GPT-2: an optional leading space, then a run of word characters or of punctuation.
_PIECES = Regex(r" ?\w+| ?[^\s\w]+|\s+")


def word_vocab(words: list[str]) -> dict[str, int]:
    """Token ids: BOS 0, UNK 1, then each word and its space-prefixed form."""
    vocab: dict[str, int] = {BOS: 0, UNK: 1}
    for word in words:
        for piece in (word, " " + word):
            vocab.setdefault(piece, len(vocab))
    return vocab


def make_word_tokenizer(words: list[str], *, add_bos_token: bool = True) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose vocabulary is ``words`` (each with and without a leading space).

    Args:
        words: The words, e.g. ``["When", "Mary", "and", "John", ","]``. A word must not
            contain whitespace.
        add_bos_token: Whether encoding prepends ``<|endoftext|>``. A tokenizer built with
            False cannot be handed to ``HookedTransformer`` (TransformerLens would try to
            reload it from the hub); assign it to ``model.tokenizer`` afterwards and set
            ``model.cfg.tokenizer_prepends_bos = False`` to test that case.
    """
    if any(any(ch.isspace() for ch in word) for word in words):
        raise ValueError("make_word_tokenizer: words must not contain whitespace.")
    backend = Tokenizer(models.WordLevel(vocab=word_vocab(words), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(_PIECES, behavior="isolated")
    # Tokens already carry their spaces: decoding concatenates them.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        unk_token=UNK,
        add_bos_token=add_bos_token,
        # TransformerLens reads init_kwargs["name_or_path"] when it is given a tokenizer.
        name_or_path="word-tokenizer-for-tests",
    )
