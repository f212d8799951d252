"""A real runtime process on loopback with the tiny MoE, driven by the official openai SDK."""

import contextlib
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from transformers import AutoTokenizer

pytestmark = [pytest.mark.slow, pytest.mark.nodb]

SERVED_NAME = "tiny-moe"


@pytest.fixture(scope="module")
def client(runtime_server):
    with openai.OpenAI(base_url=f"{runtime_server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_moe_dir):
    return AutoTokenizer.from_pretrained(tiny_moe_dir)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]


def test_chat_completion_with_exact_usage(client, tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three rivers of Europe."},
    ]
    response = client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == len(prompt_ids) + 12


def test_completion_counts_prompt_tokens_with_the_tokenizer(client, tokenizer):
    prompt = "Über den Wolken 🌍 — the sky is"
    response = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.object == "text_completion"
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert response.usage.completion_tokens == 5
    assert response.choices[0].finish_reason == "length"


def test_completion_takes_token_ids(client):
    response = client.completions.create(
        model=SERVED_NAME, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0
    )
    assert response.usage.prompt_tokens == 4


def test_streaming_matches_the_full_response_and_ends_with_usage(client):
    request = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 30,
        "temperature": 0,
    }
    full = client.chat.completions.create(**request)
    chunks = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("chat", [True, False])
def test_continuous_usage_puts_the_counts_so_far_on_every_chunk(client, chat):
    """vLLM's stream_options.continuous_usage_stats: cumulative usage on each chunk, so whoever
    relays a stream knows what was used when it is cut; the final usage chunk still comes."""
    request = {"model": SERVED_NAME, "max_tokens": 9, "temperature": 0, "stream": True}
    request["extra_body"] = {"ignore_eos": True}
    options = {"include_usage": True, "continuous_usage_stats": True}
    if chat:
        stream = client.chat.completions.create(
            **request, messages=[{"role": "user", "content": "Count."}], stream_options=options
        )
    else:
        stream = client.completions.create(**request, prompt="Count:", stream_options=options)
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 9
    assert all(
        c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks
    )
    assert chunks[-1].choices == [] and chunks[-2].choices
    assert len({c.usage.prompt_tokens for c in chunks}) == 1
    # Without include_usage, continuous_usage_stats adds nothing (as in vLLM).
    plain = client.completions.create(
        **request, prompt="Count:", stream_options={"continuous_usage_stats": True}
    )
    assert all(c.usage is None for c in plain)


def test_raw_sse_stream_ends_with_done(runtime_server):
    body = {"model": SERVED_NAME, "prompt": "Hi", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{runtime_server.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_the_text(client, stream):
    request = {
        "model": SERVED_NAME,
        "prompt": "Once upon a time",
        "max_tokens": 40,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    unstopped = client.completions.create(**request).choices[0].text
    assert len(unstopped) > 12
    stop = unstopped[8:11]
    expected = unstopped[: unstopped.find(stop)]
    if stream:
        chunks = list(client.completions.create(**request, stop=[stop, "never-there"], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(**request, stop=[stop, "never-there"]).choices[0]
        text, finish_reason = choice.text, choice.finish_reason
    assert text == expected
    assert finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return (
            client.chat.completions.create(
                model=SERVED_NAME,
                messages=[{"role": "user", "content": "Pick words."}],
                max_tokens=24,
                temperature=1.0,
                top_p=0.9,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .message.content
        )

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_greedy_outputs_under_16_concurrent_requests_equal_the_solo_outputs(client):
    prompts = [f"Request number {i}: {'word ' * (i % 5)}tell me something" for i in range(16)]

    def run(prompt):
        response = client.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=48, temperature=0
        )
        return response.choices[0].text, response.choices[0].finish_reason

    def sampled(index):
        return (
            client.completions.create(
                model=SERVED_NAME, prompt=prompts[index], max_tokens=24, temperature=0.8, seed=index
            )
            .choices[0]
            .text
        )

    solo = [run(prompt) for prompt in prompts]
    solo_sampled = [sampled(i) for i in range(4)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        concurrent_sampled = [pool.submit(sampled, i) for i in range(4)]
        concurrent = list(pool.map(run, prompts))
    assert concurrent == solo
    assert [f.result() for f in concurrent_sampled] == solo_sampled


def test_a_new_request_joins_while_another_is_generating(client, runtime_server):
    long_stream = client.completions.create(
        model=SERVED_NAME,
        prompt="A long story",
        max_tokens=1500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    try:
        iterator = iter(long_stream)
        next(iterator)
        short = client.completions.create(
            model=SERVED_NAME, prompt="Quick", max_tokens=4, temperature=0
        )
        assert short.usage.completion_tokens <= 4
        # The long request is still being generated: the short one did not wait for it.
        assert next(iterator).choices[0].finish_reason is None
        assert _metric(runtime_server.url, "vllm:num_requests_running") >= 1
    finally:
        long_stream.close()
    _wait_for(lambda: _metric(runtime_server.url, "vllm:num_requests_running") == 0)


def test_a_client_that_disconnects_frees_its_slot(runtime_server):
    url = runtime_server.url
    before = _metric(url, "vllm:generation_tokens_total")
    body = {"model": SERVED_NAME, "prompt": "Go on", "max_tokens": 2000, "ignore_eos": True}
    done = threading.Event()

    def abandon():
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        done.set()

    threading.Thread(target=abandon).start()
    _wait_for(done.is_set)
    _wait_for(lambda: _metric(url, "vllm:num_requests_running") == 0, timeout=5)
    generated = _metric(url, "vllm:generation_tokens_total") - before
    assert 0 < generated < 2000
    time.sleep(0.3)
    assert _metric(url, "vllm:generation_tokens_total") - before == generated


def test_metrics_use_vllm_names(runtime_server, client):
    client.completions.create(model=SERVED_NAME, prompt="count me", max_tokens=2)
    text = httpx.get(f"{runtime_server.url}/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_to_first_token_seconds_count",
    ):
        assert re.search(rf"^{re.escape(name)}\{{", text, re.MULTILINE), name
    assert _metric(runtime_server.url, "vllm:prompt_tokens_total") > 0
    assert _metric(runtime_server.url, "vllm:time_to_first_token_seconds_count") > 0


def test_a_repeated_prefix_is_served_from_the_cache_and_reported(runtime_server, client):
    # OpenAI's usage.prompt_tokens_details.cached_tokens, and vLLM's prefix-cache counters.
    system = "You are a careful assistant. " * 12
    url = runtime_server.url
    hits_before = _metric(url, "vllm:prefix_cache_hits_total")
    queries_before = _metric(url, "vllm:prefix_cache_queries_total")

    def ask(question):
        return client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=8,
            temperature=0,
        )

    first, second = ask("What is a block?"), ask("What is a cache?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert _metric(url, "vllm:prefix_cache_hits_total") - hits_before == cached
    assert (
        _metric(url, "vllm:prefix_cache_queries_total") - queries_before
        == first.usage.prompt_tokens + second.usage.prompt_tokens
    )
    # Asked again, the answer is the same (and now the whole prompt but its last block is cached).
    again = ask("What is a block?")
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > cached


def test_health_is_ok_when_ready(runtime_server):
    response = httpx.get(f"{runtime_server.url}/health")
    assert response.status_code == 200


# ---- bad input: OpenAI-format 400s, and the server keeps serving ----


def _bad(client, **overrides):
    request = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    request.update(overrides)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**request)
    error = raised.value.body
    assert error["type"] == "invalid_request_error"
    return error


def test_prompt_plus_max_tokens_over_the_context_is_refused(client):
    error = _bad(client, max_tokens=2040)
    assert "maximum context length is 2048 tokens" in error["message"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "max_tokens"


def test_a_prompt_longer_than_the_context_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="2048"):
        client.completions.create(model=SERVED_NAME, prompt=[7] * 2100)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"stop": 7}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"logprobs": 3}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_fields_are_refused_with_a_400(client, overrides, param):
    error = _bad(client, **overrides)
    assert error["param"] == param
    assert error["message"]


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )


def test_invalid_json_and_unknown_paths(runtime_server):
    response = httpx.post(
        f"{runtime_server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(f"{runtime_server.url}/v1/chat/completions", json=[1, 2])
    assert response.status_code == 400
    response = httpx.get(f"{runtime_server.url}/v1/nothing-here")
    assert response.status_code == 404
    assert "error" in response.json()


def test_the_server_survives_all_of_that(client, runtime_server):
    assert runtime_server.process.poll() is None
    response = client.completions.create(model=SERVED_NAME, prompt="still here?", max_tokens=2)
    assert response.usage.completion_tokens >= 1
