"""The builtin runtime serving the tiny embedding model: its encoder against transformers'
BertModel, then a real runtime process on loopback driven by the official openai SDK."""

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from tokenizers import Tokenizer

from runtime.embeddings import BertEncoder, EncoderSpec
from runtime.tiny_embedding import CONTEXT_LENGTH, HIDDEN_SIZE, build_tiny_embedding
from tests.runtime.conftest import SERVED_NAME, _start_runtime, _wait_until_ready

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Привет, как дела? 🙂",
]


@pytest.fixture(scope="module")
def tiny_embedding_dir(tmp_path_factory):
    return build_tiny_embedding(tmp_path_factory.mktemp("tiny-embedding"))


@pytest.fixture(scope="module")
def tokenizer(tiny_embedding_dir):
    return Tokenizer.from_file(str(tiny_embedding_dir / "tokenizer.json"))


def _reference(folder, token_lists):
    """Mean-pooled, normalised last hidden states from transformers' own BertModel."""
    from transformers import BertModel

    model = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    rows = []
    with torch.no_grad():
        for ids in token_lists:
            hidden = model(torch.tensor([ids])).last_hidden_state[0]
            rows.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=-1))
    return torch.stack(rows)


@pytest.mark.nodb
def test_the_builder_is_deterministic(tiny_embedding_dir, tmp_path):
    again = build_tiny_embedding(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "1_Pooling/config.json"):
        assert (again / name).read_bytes() == (tiny_embedding_dir / name).read_bytes(), name


@pytest.mark.nodb
def test_the_encoder_equals_transformers_bert_and_batching_changes_nothing(
    tiny_embedding_dir, tokenizer
):
    token_lists = [tokenizer.encode(text).ids for text in TEXTS]
    assert all(ids[0] == tokenizer.token_to_id("[CLS]") for ids in token_lists)
    assert all(ids[-1] == tokenizer.token_to_id("[SEP]") for ids in token_lists)
    spec = EncoderSpec.from_folder(tiny_embedding_dir)
    assert (spec.pooling, spec.matryoshka_dimensions) == ("mean", (32, 64, 128))
    encoder = BertEncoder(spec, tiny_embedding_dir, dtype=torch.float32, device="cpu")
    batched = encoder.encode(token_lists)  # padded to the longest, masked
    alone = torch.cat([encoder.encode([ids]) for ids in token_lists])
    assert batched.shape == (len(TEXTS), HIDDEN_SIZE)
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(batched, _reference(tiny_embedding_dir, token_lists), atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


@pytest.fixture(scope="module")
def embedding_server(tiny_embedding_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("embedding-runtime") / "runtime.log"
    runtime = _start_runtime(str(tiny_embedding_dir), log_path, "--max-num-seqs", "8")
    try:
        _wait_until_ready(runtime)
        yield runtime
    finally:
        runtime.stop()


@pytest.fixture(scope="module")
def client(embedding_server):
    with openai.OpenAI(
        base_url=f"{embedding_server.url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


@pytest.mark.slow
@pytest.mark.nodb
def test_embeddings_shape_usage_and_base64_round_trip(client, tokenizer, tiny_embedding_dir):
    floats = client.embeddings.create(model=SERVED_NAME, input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert all(len(d.embedding) == HIDDEN_SIZE for d in floats.data)
    counts = [len(tokenizer.encode(text).ids) for text in TEXTS]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(counts)
    reference = _reference(tiny_embedding_dir, [tokenizer.encode(t).ids for t in TEXTS])
    assert np.allclose([d.embedding for d in floats.data], reference.numpy(), atol=1e-5)

    # The SDK asks for base64 unless told otherwise, and decodes the float32 bytes itself.
    decoded = client.embeddings.create(model=SERVED_NAME, input=TEXTS)
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    raw = client.embeddings.with_raw_response.create(
        model=SERVED_NAME, input=TEXTS, encoding_format="base64"
    ).http_response.json()
    for row, expected in zip(raw["data"], floats.data, strict=True):
        vector = np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
        assert vector.tolist() == expected.embedding  # bit for bit

    # Token arrays are embedded as they are (no special tokens added).
    ids = tokenizer.encode(TEXTS[0]).ids
    by_tokens = client.embeddings.create(model=SERVED_NAME, input=[ids, ids[:3]])
    assert by_tokens.usage.prompt_tokens == len(ids) + 3
    assert np.allclose(by_tokens.data[0].embedding, floats.data[0].embedding, atol=1e-6)


@pytest.mark.slow
@pytest.mark.nodb
def test_dimensions_truncate_and_renormalise(client):
    full = client.embeddings.create(model=SERVED_NAME, input="Bonjour", encoding_format="float")
    short = client.embeddings.create(model=SERVED_NAME, input="Bonjour", dimensions=32)
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (32,)
    assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    head = np.array(full.data[0].embedding[:32])
    assert np.allclose(vector, head / np.linalg.norm(head), atol=1e-5)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=SERVED_NAME, input="Bonjour", dimensions=48)
    assert refused.value.body["param"] == "dimensions"


@pytest.mark.slow
@pytest.mark.nodb
def test_concurrent_requests_share_passes_and_get_their_own_rows(client):
    texts = [f"sentence number {i} " * (1 + i % 7) for i in range(24)]
    alone = [
        client.embeddings.create(model=SERVED_NAME, input=t, encoding_format="float")
        .data[0]
        .embedding
        for t in texts
    ]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda t: (
                    client.embeddings.create(
                        model=SERVED_NAME, input=[t, "padding partner"], encoding_format="float"
                    )
                    .data[0]
                    .embedding
                ),
                texts,
            )
        )
    assert np.allclose(together, alone, atol=1e-5)


@pytest.mark.slow
@pytest.mark.nodb
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input[1]"),
        ({"input": ["fine", 3]}, "input[1]"),
        ({"input": {"text": "no"}}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": "word " * CONTEXT_LENGTH}, "input"),
        ({"input": [[1, 2], [10**9]]}, "input[1]"),
        ({"input": "fine", "encoding_format": "float16"}, "encoding_format"),
        ({"input": "fine", "dimensions": 0}, "dimensions"),
        ({"input": "fine", "logit_bias": {}}, "logit_bias"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(embedding_server, body, param):
    response = httpx.post(
        f"{embedding_server.url}/v1/embeddings", json={"model": SERVED_NAME, **body}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.slow
@pytest.mark.nodb
def test_an_embedding_model_refuses_completions(client, embedding_server):
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "hi"}]
        )
    models = httpx.get(f"{embedding_server.url}/v1/models").json()
    assert models["data"][0]["max_model_len"] == CONTEXT_LENGTH


@pytest.mark.slow
@pytest.mark.nodb
def test_a_generative_model_refuses_embeddings(runtime_server):
    response = httpx.post(
        f"{runtime_server.url}/v1/embeddings", json={"model": SERVED_NAME, "input": "hi"}
    )
    assert response.status_code == 400
    assert "Embeddings API" in response.json()["error"]["message"]
