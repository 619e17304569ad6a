"""The toy world: synthetic clips of coloured shapes in which the whole method trains on a CPU.

Spec: ../shared/design/toyworld.md. This file owns the world itself (the tokenizer of the toy base model,
clips, prompts and answers). Training the toy base model and scoring fidelity live beside it.
"""
from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# SmolLM2's 17 control tokens keep ids 0..16 (smolvlm2.md §6); <|im_start|> = 1 starts every chat prompt.
CONTROL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]
# SmolVLM2's 128 added tokens, in the released order (smolvlm2.md §2): they follow the BPE vocabulary.
ADDED_TOKENS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(88)]
    + ["<end_of_utterance>"]
)


def build_tokenizer(corpus: list[str], bpe_vocab_size: int = 1024) -> Tokenizer:
    """A small SmolLM2-style byte-level BPE trained on `corpus`, with SmolVLM2's special tokens.

    The pipeline is SmolLM2's (smolvlm2.md §6): no normalizer, Digits(individual) then ByteLevel pre-tokenizer,
    ByteLevel decoder, no post-processor (nothing is prepended). Only the vocabulary is smaller, so the toy
    model's embedding stays small. Ids: control tokens 0..16, then the learned BPE tokens (at most
    `bpe_vocab_size` in all), then the 128 added tokens, laid out as the real vocabulary is (49152 + 128 there).
    Code must therefore read special ids such as `<image>` from the tokenizer, never hard-code 49190.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, special_tokens=CONTROL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    return tok
