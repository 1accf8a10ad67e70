"""Pieces of the tiny random model folders every family's ``tiny`` module shares: a word-level
tokenizer over the synthetic world's caption words (pad ``<pad>`` id 0, ``</s>`` appended, as
T5's and UMT5's are)."""

from __future__ import annotations

WORDS = ("a an the red green blue yellow orange purple cyan magenta white gray square triangle circle disc "
         "moves left right up down over under striped textured background bounces falls slowly quickly and "
         "with of on in small large two three one object objects video clip scene").split()


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` with pad ``<pad>`` (id 0) and end-of-sequence
    ``</s>`` appended; unknown words map to ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


VOCAB = len(WORDS) + 3
