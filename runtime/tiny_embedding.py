"""A tiny BERT-format embedding checkpoint, built locally and deterministically.

The folder it writes is a real Hugging Face `BertModel` checkpoint laid out as a
sentence-transformers model (the layout of `BAAI/bge-*` and `intfloat/e5-*`): config.json,
model.safetensors under BertModel's tensor names, a tokenizer.json whose post-processor adds
`[CLS]` and `[SEP]`, and modules.json + 1_Pooling/config.json saying how sentences are pooled
(mean over tokens) and that vectors are normalised. transformers' `BertModel`, the
sentence-transformers library and vLLM's pooling runner all read it as they read a published
embedding model; the builtin runtime serves it (runtime/embeddings.py).

Small: 2 layers, hidden size 128, 512 positions, the tiny MoE's byte-level BPE corpus. Its
weights are random (seeded), so its vectors carry no meaning; it exists so that the embeddings
path (gateway, limits, billing, console) runs end to end on a laptop CPU. config.json declares
Matryoshka dimensions (vLLM's `matryoshka_dimensions`), so `dimensions` works on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from runtime.manifest import write_manifest
from runtime.tiny_moe import TRAINING_CORPUS

CONTEXT_LENGTH = 512
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_ATTENTION_HEADS = 4
TOKENIZER_VOCAB_TARGET = 1024
MATRYOSHKA_DIMENSIONS = [32, 64, 128]
INIT_STD = 0.02

PAD, CLS, SEP, UNK = "[PAD]", "[CLS]", "[SEP]", "[UNK]"
SPECIAL_TOKENS = [PAD, CLS, SEP, UNK]  # ids 0..3, as in BERT's vocabularies: [PAD] is 0


def build_tiny_embedding(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the tiny embedding checkpoint folder into `out_dir` (created if missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(out_dir / "config.json", _model_config(vocab_size))
    # sentence-transformers' layout: which modules run, and how tokens are pooled.
    _write_json(
        out_dir / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
    )
    _write_json(
        out_dir / "sentence_bert_config.json",
        {"max_seq_length": CONTEXT_LENGTH, "do_lower_case": False},
    )
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    _write_json(
        out_dir / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": HIDDEN_SIZE,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    (out_dir / "2_Normalize").mkdir(exist_ok=True)
    _write_json(out_dir / "2_Normalize" / "config.json", {})
    weights_path = out_dir / "model.safetensors"
    save_file(_random_weights(vocab_size, seed), str(weights_path), metadata={"format": "pt"})
    weights_path.chmod(0o644)
    write_manifest(out_dir)
    return out_dir


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_TARGET,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_CORPUS.splitlines(keepends=True), trainer=trainer)
    # [CLS] text [SEP], as every BERT tokenizer encodes a sentence (add_special_tokens=True).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, tokenizer.token_to_id(CLS)), (SEP, tokenizer.token_to_id(SEP))],
    )
    return tokenizer


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "cls_token": CLS,
        "sep_token": SEP,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONTEXT_LENGTH,
    }


def _model_config(vocab_size: int) -> dict:
    # Written by hand so that the bytes do not change with the installed transformers version.
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_ATTENTION_HEADS,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": CONTEXT_LENGTH,
        "type_vocab_size": 2,
        "initializer_range": INIT_STD,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        # vLLM's name for the output sizes `dimensions` may ask for (Matryoshka truncation).
        "matryoshka_dimensions": MATRYOSHKA_DIMENSIONS,
        "dtype": "float32",
    }


def _random_weights(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded normal weights under BertModel's tensor names (no pooler: sentence-transformers
    pools the token states itself)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * INIT_STD

    def layer_norm(prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": torch.ones(HIDDEN_SIZE),
            f"{prefix}.bias": torch.zeros(HIDDEN_SIZE),
        }

    def linear(prefix: str, rows: int, columns: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": normal(rows, columns), f"{prefix}.bias": torch.zeros(rows)}

    tensors = {
        "embeddings.word_embeddings.weight": normal(vocab_size, HIDDEN_SIZE),
        "embeddings.position_embeddings.weight": normal(CONTEXT_LENGTH, HIDDEN_SIZE),
        "embeddings.token_type_embeddings.weight": normal(2, HIDDEN_SIZE),
        **layer_norm("embeddings.LayerNorm"),
    }
    for layer in range(NUM_LAYERS):
        prefix = f"encoder.layer.{layer}"
        for name in ("query", "key", "value"):
            tensors.update(linear(f"{prefix}.attention.self.{name}", HIDDEN_SIZE, HIDDEN_SIZE))
        tensors.update(linear(f"{prefix}.attention.output.dense", HIDDEN_SIZE, HIDDEN_SIZE))
        tensors.update(layer_norm(f"{prefix}.attention.output.LayerNorm"))
        tensors.update(linear(f"{prefix}.intermediate.dense", INTERMEDIATE_SIZE, HIDDEN_SIZE))
        tensors.update(linear(f"{prefix}.output.dense", HIDDEN_SIZE, INTERMEDIATE_SIZE))
        tensors.update(layer_norm(f"{prefix}.output.LayerNorm"))
    return tensors


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
