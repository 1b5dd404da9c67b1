"""Tiny randomly initialised models of every supported family, built offline from configs (for tests).

Each has 3 layers, width 64 and a byte-level tokenizer (256 byte tokens plus <pad>/<bos>/<eos>), so they load in
milliseconds and exercise the same code paths as the real models: tied and untied heads, grouped-query attention,
scaled embeddings (Gemma), logit soft-capping (Gemma 2), learned positions (GPT-2), partial rotary (NeoX).
"""

from __future__ import annotations

import torch

from workbench.models import Model, from_hf

N_LAYERS = 3
D_MODEL = 64
VOCAB = 259  # 256 bytes + <pad> <bos> <eos>
PAD, BOS, EOS = 256, 257, 258


def byte_tokenizer():
    """A byte-level fast tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # ByteLevel pre-tokenisation maps bytes to printable characters; map those characters to ids 0..255.
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    b2u = bytes_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    assert set(vocab) == set(byte_chars)
    vocab.update({"<pad>": PAD, "<bos>": BOS, "<eos>": EOS})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


def tiny_config(family: str):
    """A small config of ``family`` (a ``model_type`` from ``workbench.arch.SUPPORTED_FAMILIES``)."""
    import transformers as T

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    decoder = dict(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    if family == "llama":
        return T.LlamaConfig(**decoder, tie_word_embeddings=True)
    if family == "mistral":
        return T.MistralConfig(**decoder, sliding_window=8, tie_word_embeddings=False)
    if family == "qwen2":
        return T.Qwen2Config(**decoder, tie_word_embeddings=True)
    if family == "qwen3":
        return T.Qwen3Config(**decoder, head_dim=16, tie_word_embeddings=False)
    if family == "gemma2":
        return T.Gemma2Config(
            **decoder, head_dim=16, sliding_window=8, final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
            query_pre_attn_scalar=16,
        )
    if family == "gemma3_text":
        return T.Gemma3TextConfig(**decoder, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    if family == "gpt2":
        return T.GPT2Config(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=128, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(
            hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, rotary_pct=0.25, tie_word_embeddings=False, **common,
        )
    from workbench.arch import SUPPORTED_FAMILIES

    raise ValueError(f"no tiny config for family {family!r}; families: {sorted(SUPPORTED_FAMILIES)}")


def tiny_hf(family: str, seed: int = 0):
    """The transformers model of :func:`tiny_config`, with seeded random weights, eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norm weights at their identity; perturb every parameter so no site is trivial.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return hf.eval()


def tiny_model(family: str = "llama", seed: int = 0) -> Model:
    """A workbench :class:`Model` around :func:`tiny_hf` and the byte tokenizer."""
    return from_hf(tiny_hf(family, seed), byte_tokenizer(), name=f"tiny-{family}")
