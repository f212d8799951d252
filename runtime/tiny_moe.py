"""A tiny Mixtral-format mixture-of-experts checkpoint, built locally and deterministically.

The folder it writes is a real Hugging Face Mixtral checkpoint (the same file names and tensor
names as `mistralai/Mixtral-8x7B-v0.1`), only small: 8 experts, 2 per token, a few MB. Nothing is
fetched from a hub: the byte-level BPE tokenizer is trained here on the small multilingual corpus
below, so any UTF-8 text round-trips. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from runtime.manifest import MANIFEST_FORMAT, MANIFEST_NAME, sha256_of, write_manifest

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "build_tiny_moe", "sha256_of", "write_manifest"]

CONTEXT_LENGTH = 2048
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_ATTENTION_HEADS = 4
NUM_KEY_VALUE_HEADS = 2
NUM_EXPERTS = 8
EXPERTS_PER_TOKEN = 2
TOKENIZER_VOCAB_TARGET = 1024
# Larger than the usual 0.02 so that a random model's greedy output wanders over the vocabulary
# instead of repeating one token, which makes stop sequences and streaming worth testing.
INIT_STD = 0.08

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Mistral's tool-use control tokens (its v3 tokenizer's names), so that tools, calls and results
# render as Mistral's chat template renders them and a call starts with one token the runtime's
# grammar can branch on (runtime/structured.py).
AVAILABLE_TOOLS = "[AVAILABLE_TOOLS]"
AVAILABLE_TOOLS_END = "[/AVAILABLE_TOOLS]"
TOOL_CALLS = "[TOOL_CALLS]"
TOOL_RESULTS = "[TOOL_RESULTS]"
TOOL_RESULTS_END = "[/TOOL_RESULTS]"
SPECIAL_TOKENS = [
    END_OF_TEXT,
    IM_START,
    IM_END,
    AVAILABLE_TOOLS,
    AVAILABLE_TOOLS_END,
    TOOL_CALLS,
    TOOL_RESULTS,
    TOOL_RESULTS_END,
]

# ChatML turns; inside them, Mistral's tool rendering: the tools as a JSON array before the last
# user message, an assistant's calls as `[TOOL_CALLS]` and a JSON array of {name, arguments, id},
# a tool's result as `[TOOL_RESULTS]{"content": ..., "call_id": ...}[/TOOL_RESULTS]`.
CHAT_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if tools and loop.index0 == ns.last_user %}"
    "{{ '[AVAILABLE_TOOLS]' + tools|tojson + '[/AVAILABLE_TOOLS]' }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '[TOOL_RESULTS]' + {'content': message['content'], 'call_id': message['tool_call_id']}"
    "|tojson + '[/TOOL_RESULTS]' }}"
    "{% else %}"
    "{{ message['content'] or '' }}"
    "{% endif %}"
    "{% if message['tool_calls'] %}"
    "{{ '[TOOL_CALLS][' }}"
    "{% for call in message['tool_calls'] %}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments'], "
    "'id': call['id']}|tojson }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}"
    "{% endfor %}"
    "{{ ']' }}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAINING_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model is served by a runtime on a cluster.
Open models as a service: deploy, call the API, read the invoice, pay per token.
Hello, world! How are you today? I am fine, thank you. What time is it? It is 10:42.
Le vif renard brun saute par-dessus le chien paresseux. Bonjour, comment allez-vous ?
Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München und Köln.
El veloz zorro marrón salta sobre el perro perezoso. ¿Dónde está la estación? ¡Olé!
A rápida raposa marrom pula sobre o cão preguiçoso. Não há coração sem emoção.
La volpe marrone veloce salta sopra il cane pigro. Perché no? Così è la vita.
De snelle bruine vos springt over de luie hond. Goedemorgen, hoe gaat het?
Szybki brązowy lis przeskakuje nad leniwym psem. Zażółć gęślą jaźń.
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, как дела?
Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο. Καλημέρα κόσμε.
الثعلب البني السريع يقفز فوق الكلب الكسول. مرحبا بالعالم.
השועל החום המהיר קופץ מעל הכלב העצלן. שלום עולם.
तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है। नमस्ते दुनिया।
敏捷的棕色狐狸跳过了懒狗。你好，世界！今天天气很好。
素早い茶色の狐がのろまな犬を飛び越える。こんにちは、世界。ありがとう。
빠른 갈색 여우가 게으른 개를 뛰어넘는다. 안녕하세요, 세계.
สุนัขจิ้งจอกสีน้ำตาลกระโดดข้ามสุนัขขี้เกียจ สวัสดีชาวโลก
Con cáo nâu nhanh nhẹn nhảy qua con chó lười. Xin chào thế giới.
Hızlı kahverengi tilki tembel köpeğin üzerinden atlar. Merhaba dünya.
Emoji too: 🙂 🚀 ✨ 🌍 — and symbols: € £ ¥ © ® ™ ± × ÷ ≤ ≥ ≠ ∞ √ π.
def add(a, b):
    return a + b

for i in range(10):
    print(f"{i}: {add(i, i)}")
{"model": "tiny-moe", "messages": [{"role": "user", "content": "Say hello."}]}
SELECT id, name FROM models WHERE org_id = 42 ORDER BY created_at DESC;
0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 1e-5 0x1F
"""  # noqa: RUF001 (lookalike letters are the point of a multilingual corpus)


@dataclass(frozen=True)
class MoeShape:
    """The sizes of a random MoE built here: the tiny model's by default. Benchmarks build wider
    and deeper ones where the forward pass, not the process around it, should dominate."""

    hidden_size: int = HIDDEN_SIZE
    intermediate_size: int = INTERMEDIATE_SIZE
    num_layers: int = NUM_LAYERS

    @property
    def head_dim(self) -> int:
        return self.hidden_size // NUM_ATTENTION_HEADS


TINY = MoeShape()


def build_tiny_moe(out_dir: Path, *, seed: int = 0, shape: MoeShape = TINY) -> Path:
    """Write the tiny MoE checkpoint folder into `out_dir` (created if missing) and return it.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json and manifest.json (every other file with its size and sha256).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()
    end_of_text_id = tokenizer.token_to_id(END_OF_TEXT)
    im_end_id = tokenizer.token_to_id(IM_END)

    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(
        out_dir / "config.json", _model_config(vocab_size, end_of_text_id, im_end_id, shape)
    )
    _write_json(
        out_dir / "generation_config.json",
        {"eos_token_id": [im_end_id, end_of_text_id], "pad_token_id": end_of_text_id},
    )
    weights_path = out_dir / "model.safetensors"
    save_file(
        _random_weights(vocab_size, seed, shape), str(weights_path), metadata={"format": "pt"}
    )
    weights_path.chmod(0o644)  # safetensors creates it owner-only; the other files are 0644
    write_manifest(out_dir)
    return out_dir


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_TARGET,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so text never seen in the corpus still encodes (no unknown token).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONTEXT_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def _model_config(vocab_size: int, end_of_text_id: int, im_end_id: int, shape: MoeShape) -> dict:
    # Written by hand rather than by MixtralConfig.save_pretrained so that the bytes do not change
    # with the installed transformers version; transformers' MixtralConfig reads every key.
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": NUM_ATTENTION_HEADS,
        "num_key_value_heads": NUM_KEY_VALUE_HEADS,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": CONTEXT_LENGTH,
        "initializer_range": INIT_STD,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": EXPERTS_PER_TOKEN,
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": im_end_id,
        "pad_token_id": end_of_text_id,
        "dtype": "float32",
        "use_cache": True,
    }


def _random_weights(vocab_size: int, seed: int, shape: MoeShape) -> dict[str, torch.Tensor]:
    """Seeded normal weights under the tensor names of the original Mixtral checkpoints."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=generator) * INIT_STD

    hidden, intermediate = shape.hidden_size, shape.intermediate_size
    heads, kv_heads = NUM_ATTENTION_HEADS * shape.head_dim, NUM_KEY_VALUE_HEADS * shape.head_dim
    tensors = {"model.embed_tokens.weight": normal(vocab_size, hidden)}
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(hidden)
        tensors[f"{prefix}.self_attn.q_proj.weight"] = normal(heads, hidden)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = normal(kv_heads, hidden)
        tensors[f"{prefix}.self_attn.v_proj.weight"] = normal(kv_heads, hidden)
        tensors[f"{prefix}.self_attn.o_proj.weight"] = normal(hidden, heads)
        tensors[f"{prefix}.block_sparse_moe.gate.weight"] = normal(NUM_EXPERTS, hidden)
        for expert in range(NUM_EXPERTS):
            expert_prefix = f"{prefix}.block_sparse_moe.experts.{expert}"
            tensors[f"{expert_prefix}.w1.weight"] = normal(intermediate, hidden)
            tensors[f"{expert_prefix}.w2.weight"] = normal(hidden, intermediate)
            tensors[f"{expert_prefix}.w3.weight"] = normal(intermediate, hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal(vocab_size, hidden)
    return tensors


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
