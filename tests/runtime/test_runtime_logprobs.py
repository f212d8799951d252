"""logprobs / top_logprobs, n choices and per-request seeds on a real runtime process serving the
tiny MoE, through the official openai SDK: OpenAI's shapes, streamed and not."""

import openai
import pytest

from tests.runtime.conftest import SERVED_NAME

pytestmark = [pytest.mark.slow, pytest.mark.nodb]

MESSAGES = [{"role": "user", "content": "Name three rivers of Europe."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(runtime_server):
    with openai.OpenAI(base_url=f"{runtime_server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_chat_logprobs_are_consistent_with_the_greedy_tokens(client):
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=10, logprobs=True, top_logprobs=3,
        **GREEDY,
    )  # fmt: skip
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 10
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # Greedy: the most likely token is the one generated, with the same logprob.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.logprob <= 0
    # A token may hold part of a character; the tokens' bytes together are the text.
    text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert text == choice.message.content  # (a random model makes stray bytes too)

    plain = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=10, **GREEDY
    )
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content

    # Streamed: the same tokens and logprobs, chunk by chunk.
    streamed = []
    text = ""
    for chunk in client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=10, logprobs=True, top_logprobs=3,
        stream=True, **GREEDY,
    ):  # fmt: skip
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == choice.message.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content
    ]


def test_completion_logprobs_in_the_legacy_shape(client):
    reply = client.completions.create(
        model=SERVED_NAME, prompt="The quick brown fox", max_tokens=6, logprobs=2, **GREEDY
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset[0] == 0
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert max(top, key=top.get) == token
        assert top[token] == pytest.approx(logprob)
        assert 1 <= len(top) <= 3  # two alternatives and the sampled token, less any alike
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=2, logprobs=6)


def test_n_choices_are_separate_samples_and_all_counted(client):
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=5, n=3, seed=7, temperature=1.0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == 15
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1  # seed + index: the choices differ
    again = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=5, n=3, seed=7, temperature=1.0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.message.content for c in again.choices] == texts  # the seed is honoured
    other = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=5, seed=8, temperature=1.0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert other.choices[0].message.content == texts[1]  # choice 1 sampled with seed 7 + 1

    chunks = list(
        client.chat.completions.create(
            model=SERVED_NAME, messages=MESSAGES, max_tokens=5, n=3, seed=7, temperature=1.0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    streamed = ["", "", ""]
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == texts and finished == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-1].choices == []

    completions = client.completions.create(
        model=SERVED_NAME, prompt="Once upon a time", max_tokens=4, n=2, seed=3, logprobs=1,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in completions.choices] == [0, 1]
    assert all(len(c.logprobs.tokens) == 4 for c in completions.choices)
    assert completions.usage.completion_tokens == 8
