"""Constrained decoding: tool calls and JSON output by grammar, with llguidance.

A request's OutputSpec (runtime/chat.py) becomes a grammar, compiled against the model's
tokenizer into a matcher; at each step the engine masks every token the grammar forbids before
sampling, so the output parses whatever the weights are. llguidance was chosen over xgrammar
by measurement (docs/benchmarks.md): both compute a mask in microseconds on these vocabularies,
and llguidance has no dependencies (xgrammar brings triton and pydantic) and bounds the work of
an adversarial grammar by explicit fuel limits.

Tool calls take Mistral's format: the `[TOOL_CALLS]` control token, then a JSON array of
`{"name": ..., "arguments": {...}}` (as Mistral's models emit and vLLM's mistral tool parser
reads). With tool_choice `auto` the grammar is "text, or a call": the model's first token
decides. A tokenizer without the control token gets the same marker as plain text.
"""

from __future__ import annotations

import functools
import json
import secrets
import string
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import llguidance
import torch
from tokenizers import Tokenizer

from runtime.chat import OutputSpec
from runtime.schemas import InvalidRequest

TOOL_CALLS_MARKER = "[TOOL_CALLS]"
# Whitespace as Python's json.dumps and Mistral's templates write it, so a call the model made
# reads back in the next prompt the way it was generated.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
# Mistral's templates require call ids of 9 letters and digits (vLLM's mistral parser too).
CALL_ID_LENGTH = 9
# Compiled grammars kept per model for requests that repeat a schema, and the longest grammar
# text kept: a client sending many large schemas must not pin their compiled forms in memory
# (a larger one is compiled for each request, as any new one is).
COMPILED_GRAMMARS = 64
COMPILED_GRAMMAR_MAX_BYTES = 16 * 1024
_CALL_ID_ALPHABET = string.ascii_letters + string.digits
# The work one grammar may cost: compiling (initial_lexer_fuel, about 20 ms at llguidance's
# rate) and each step's mask (step_lexer_fuel and step_max_items, a few ms). A grammar over
# these bounds errors instead of stalling the engine's batch.
# Over the last tokens of its budget a JSON answer is steered to close: among the tokens the
# grammar allows, those that end something (`}`, `]`, a string's quote, EOS) win. Without it a
# model that rambles (the random-weight tiny MoE always does) runs out of max_tokens inside a
# string and leaves JSON that does not parse; with it the answer is shorter but whole.
CLOSING_RESERVE_TOKENS = 64
_CLOSING_BONUS = 1e4


def closing_reserve(max_tokens: int) -> int:
    """How many of the last tokens of the budget are steered to close the JSON."""
    return max(1, min(CLOSING_RESERVE_TOKENS, max_tokens // 2))


PARSER_LIMITS = {
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "step_max_items": 50_000,
    "max_grammar_size": 200_000,
}


def new_call_id() -> str:
    return "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(CALL_ID_LENGTH))


class Grammars:
    """A model's tokenizer as llguidance sees it, and the grammars requests compile to."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int | None, vocab_size: int):
        """`tokenizer`: the model's `tokenizers` tokenizer; `vocab_size`: the logits' width."""
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos_token_id
        )
        special = {
            token_id
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special
        }
        marker = tokenizer.token_to_id(TOOL_CALLS_MARKER)
        # The control token when the tokenizer has one (Mistral v3 and later, the tiny MoE).
        self.call_token: int | None = marker if marker in special else None
        self.closing = ClosingScores(self.tokenizer, special, eos_token_id, vocab_size)
        # Grammar text -> its compiled matcher, untouched (requests get copies); LRU.
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._compiled_lock = threading.Lock()

    def grammar(self, spec: OutputSpec) -> str:
        """The llguidance grammar for a constrained request."""
        if not spec.calls_tools:
            return llguidance.LLMatcher.grammar_from_json_schema(
                spec.json_schema, defaults=JSON_STYLE
            )
        calls = _json_rule(self._calls_schema(spec))
        marker = f"<[{self.call_token}]>" if self.call_token is not None else '"[TOOL_CALLS]"'
        lines = [f"calls: {marker} calls_body", f"calls_body: {calls}"]
        if spec.tool_choice == "auto":
            if spec.json_schema is not None:
                lines += ["start: answer | calls", f"answer: {_json_rule(spec.json_schema)}"]
            elif self.call_token is not None:
                lines += ["start: TEXT | calls", "TEXT: /(?s:.*)/"]
            else:  # text that is not a call: it must not start with the marker
                lines += ["start: TEXT | calls", r"TEXT: /(?s:.*)/ & ~/\[TOOL_CALLS\](?s:.*)/"]
        else:
            lines.insert(0, "start: calls")
        return llguidance.LLMatcher.grammar_from_lark("\n".join(lines))

    def constraint(self, spec: OutputSpec) -> Constraint:
        """A request's grammar state: a copy of the compiled grammar when the same grammar was
        compiled lately (clients send the same schema again and again; a copy costs about a
        microsecond, a compile about a millisecond for a modest schema), else compiled now
        (blocking; llguidance drops the GIL meanwhile)."""
        grammar = self.grammar(spec)
        with self._compiled_lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                matcher = compiled.deep_copy()
        if compiled is None:
            matcher = llguidance.LLMatcher(
                self.tokenizer,
                grammar,
                log_level=0,
                limits=llguidance.LLParserLimits(**PARSER_LIMITS),
            )
            if matcher.is_error():
                raise InvalidRequest(
                    f"the schema cannot be compiled into a grammar: {matcher.get_error()}",
                    "response_format" if not spec.calls_tools else "tools",
                )
            if len(grammar) <= COMPILED_GRAMMAR_MAX_BYTES:
                with self._compiled_lock:
                    self._compiled[grammar] = matcher.deep_copy()
                    if len(self._compiled) > COMPILED_GRAMMARS:
                        self._compiled.popitem(last=False)
        return Constraint(
            matcher,
            self.call_token,
            closing=self.closing,
            always_json=spec.json_schema is not None
            or spec.tool_choice in ("required", "function"),
        )

    @staticmethod
    def _calls_schema(spec: OutputSpec) -> dict:
        functions = [
            f
            for f in spec.functions
            if spec.tool_choice != "function" or f.name == spec.named_function
        ]
        one_call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for f in functions
            ]
        }
        schema = {"type": "array", "items": one_call, "minItems": 1}
        if not spec.parallel_tool_calls or spec.tool_choice == "function":
            schema["maxItems"] = 1
        return schema


def _json_rule(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


class Constraint:
    """One request's grammar state. Built off the engine thread; from `Engine.submit` on, used
    by the engine thread alone (the server reads `calling` once events arrive)."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        call_token: int | None,
        *,
        closing: ClosingScores,
        always_json: bool,
    ):
        self.matcher = matcher
        self.call_token = call_token
        self.closing = closing
        self._in_string = False  # the JSON written so far ends inside a string
        self._escaped = False  # ... right after a backslash
        self.always_json = always_json  # no free-text branch: the answer is JSON or calls
        self.calling = False  # the first token was the tool-call control token
        self.consumed = 0

    @property
    def steers_to_close(self) -> bool:
        """JSON is being written (not free text), so the end of the budget steers it shut."""
        return self.always_json or self.calling

    def consume(self, token: int) -> bool:
        if self.consumed == 0 and token == self.call_token:
            self.calling = True
        elif 0 <= token < len(self.closing.token_bytes):
            self._track(self.closing.token_bytes[token])
        self.consumed += 1
        return self.matcher.consume_token(token)

    def _track(self, text: bytes) -> None:
        for byte in text:
            if self._escaped:
                self._escaped = False
            elif byte == 0x5C and self._in_string:  # backslash
                self._escaped = True
            elif byte == 0x22:  # quote
                self._in_string = not self._in_string

    def closing_bonus(self) -> torch.Tensor | None:
        """What to add to the logits to steer the JSON shut from where it is now."""
        if self._escaped:
            return None
        return self.closing.in_string if self._in_string else self.closing.outside

    def is_stopped(self) -> bool:
        """Nothing but the end of the sequence can follow."""
        return self.matcher.is_stopped()

    def error(self) -> str:
        return self.matcher.get_error()


class ClosingScores:
    """Per token, how much it brings JSON to a close, in two cases: written inside a string
    (a token that starts with the closing quote ends it; one that also closes a bracket does
    more) and outside one (a bracket closed, a string opened that can end at once, a comma
    before a shorter value; the end of the sequence most). Only allowed tokens are compared,
    so these rank the grammar's choices; they never make a token allowed. [vocab] float32."""

    def __init__(
        self,
        llg_tokenizer: llguidance.LLTokenizer,
        special: set[int],
        eos: int | None,
        vocab_size: int,
    ):
        self.vocab_size = vocab_size  # the logits' width
        count = min(llg_tokenizer.vocab_size, vocab_size)
        self.token_bytes = [
            b"" if token in special else llg_tokenizer.decode_bytes([token])
            for token in range(count)
        ]
        outside = torch.zeros(vocab_size)
        in_string = torch.zeros(vocab_size)
        for token, text in enumerate(self.token_bytes):
            closes_bracket = b"}" in text or b"]" in text
            if closes_bracket:
                outside[token] = 3
            elif b'"' in text:
                outside[token] = 2
            elif b"," in text:
                outside[token] = 1
            if text.startswith(b'"'):
                in_string[token] = 3 if closes_bracket else 2
        if eos is not None and eos < vocab_size:
            outside[eos] = 4
        self.outside = outside * _CLOSING_BONUS
        self.in_string = in_string * _CLOSING_BONUS


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class PendingMasks:
    """The allowed-token bitmasks of one step's constrained rows, being computed."""

    def __init__(self, rows: list[int], bitmask: torch.Tensor | None, future: Future | None):
        self.rows = rows  # the batch rows with a constraint
        self._bitmask = bitmask  # [len(rows), words] int32, one bit per token
        self._future = future

    def wait(self) -> torch.Tensor:
        if self._future is not None:
            self._future.result()
        return self._bitmask


class MaskPool:
    """Computes a step's grammar masks on a thread of its own (the engine thread meanwhile
    runs the forward pass; llguidance releases the GIL)."""

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._masks: llguidance.LLExecutor | None = None

    def start(self, sequences) -> PendingMasks:
        rows = [row for row, s in enumerate(sequences) if s.constraint is not None]
        if not rows:
            return PendingMasks(rows, None, None)
        constraints = [sequences[row].constraint for row in rows]
        width = bitmask_width(constraints[0].closing.vocab_size)
        bitmask = torch.full((len(rows), width), -1, dtype=torch.int32)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
            self._masks = llguidance.LLExecutor(num_threads=1)
        # All rows in one call that holds no GIL: a loop of one call per row took the GIL back
        # between rows, waiting on the engine thread each time.
        matchers = [(constraint.matcher, index) for index, constraint in enumerate(constraints)]
        fill = functools.partial(
            self._masks.unsafe_compute_mask_ptr,
            matchers,
            bitmask.data_ptr(),
            width * bitmask.element_size(),
            len(rows),
        )
        return PendingMasks(rows, bitmask, self._executor.submit(fill))


# Each byte value's 8 bits, low bit first: [256, 8] bool. A bitmask's bytes, looked up here in
# order, are its tokens in order (little-endian words).
_BYTE_BITS = (
    (torch.arange(256, dtype=torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
).bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Logits with the forbidden tokens of `rows` at -inf. logits [n, vocab]; bitmask
    [len(rows), words] int32, bit i of word j allowing token 32 j + i."""
    vocab = logits.shape[-1]
    allowed = _BYTE_BITS[bitmask.view(torch.uint8).long()].flatten(1)[:, :vocab]
    allowed = allowed.to(logits.device)  # [len(rows), vocab]
    if len(rows) == logits.shape[0]:
        return torch.where(allowed, logits, float("-inf"))
    logits = logits.clone()
    logits[rows] = torch.where(allowed, logits[rows], float("-inf"))
    return logits


# ---- reading the output back -----------------------------------------------------------------


@dataclass
class _Call:
    id: str
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCallReader:
    """Reads generated text (the JSON array after the marker) into OpenAI's tool calls, as it
    streams: `feed` returns the `tool_calls` deltas OpenAI would send for the new text (first
    the call's id, type and name with empty arguments, then pieces of its arguments).

    The grammar fixed the layout (`[{"name": "...", "arguments": {...}}, ...]`), so a small
    scanner that tracks strings and nesting finds the name and the arguments' span.
    """

    literal_marker: bool = False  # the marker arrives as text (no control token)
    calls: list[_Call] = field(default_factory=list)
    _skip: int = 0  # characters of marker still to drop
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _expect_key: bool = False
    _string: list[str] = field(default_factory=list)
    _key: str | None = None
    _in_arguments: bool = False
    _arguments_depth: int = 0

    def __post_init__(self) -> None:
        self._skip = len(TOOL_CALLS_MARKER) if self.literal_marker else 0

    def feed(self, text: str) -> list[dict]:
        deltas: list[dict] = []
        for char in text:
            if self._skip:
                self._skip -= 1
                continue
            deltas.extend(self._scan(char))
        return _merge(deltas)

    def _scan(self, char: str) -> Iterator[dict]:
        if self._in_arguments:
            yield from self._argument_char(char)
            return
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                yield from self._string_done(json.loads('"' + "".join(self._string) + '"'))
                return
            self._string.append(char)
            return
        if char == '"':
            self._in_string, self._string = True, []
        elif char in "{[":
            self._depth += 1
            if self._depth == 2 and char == "{":  # a call starts
                self.calls.append(_Call(id=new_call_id()))
                self._expect_key = True
        elif char in "}]":
            self._depth -= 1
        elif char == "," and self._depth == 2:
            self._expect_key = True
        elif char == ":" and self._depth == 2:
            self._expect_key = False
            if self._key == "arguments":
                self._in_arguments, self._arguments_depth = True, 0

    def _string_done(self, value: str) -> Iterator[dict]:
        if self._depth != 2:
            return
        if self._expect_key:
            self._key = value
        elif self._key == "name":
            call = self.calls[-1]
            call.name = value
            yield {
                "index": len(self.calls) - 1,
                "id": call.id,
                "type": "function",
                "function": {"name": value, "arguments": ""},
            }

    def _argument_char(self, char: str) -> Iterator[dict]:
        call = self.calls[-1]
        if not call.arguments and char in " \t\n":
            return  # the space after the colon
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._arguments_depth += 1
        elif char in "}]" or (char == "," and self._arguments_depth == 0):
            if self._arguments_depth == 0:  # the call's own brace (or next key): arguments end
                self._in_arguments = False
                self._key = None
                yield from self._scan(char)
                return
            self._arguments_depth -= 1
        call.arguments += char
        yield {"index": len(self.calls) - 1, "function": {"arguments": char}}

    def tool_calls(self) -> list[dict]:
        """The calls read so far, as a message's `tool_calls`."""
        return [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in self.calls
            if call.name is not None
        ]


def _merge(deltas: list[dict]) -> list[dict]:
    """Join consecutive argument pieces of one call into one delta."""
    merged: list[dict] = []
    for delta in deltas:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and set(delta) == set(previous) == {"index", "function"}
            and previous["index"] == delta["index"]
            and "arguments" in previous["function"]
        ):
            previous["function"] = {
                **previous["function"],
                "arguments": previous["function"]["arguments"] + delta["function"]["arguments"],
            }
        else:
            merged.append(delta)
    return merged


class AnswerReader:
    """Splits a constrained answer into content and tool calls, as it streams.

    `feed` returns ("content", text) and ("tool_call", delta) items for the new text. With the
    control token, whether the answer is a call is known from its first token; with a textual
    marker, text that could still become the marker is held back until it cannot.
    """

    def __init__(self, output: OutputSpec, constraint: Constraint | None):
        self.constraint = constraint
        self.literal = constraint is not None and constraint.call_token is None
        self.mode = "calls?" if output.calls_tools and constraint is not None else "content"
        self.calls = ToolCallReader(literal_marker=self.literal)
        self.pending = ""

    @property
    def called(self) -> bool:
        return self.mode == "calls"

    def feed(self, text: str) -> list[tuple[str, object]]:
        if self.mode == "calls?":
            if not self.literal:
                self.mode = "calls" if self.constraint.calling else "content"
            else:
                self.pending += text
                if self.pending.startswith(TOOL_CALLS_MARKER):
                    self.mode = "calls"
                elif not TOOL_CALLS_MARKER.startswith(self.pending):
                    self.mode = "content"
                else:
                    return []
                text, self.pending = self.pending, ""
        if self.mode == "calls":
            return [("tool_call", delta) for delta in self.calls.feed(text)]
        return [("content", text)] if text else []

    def finish(self) -> list[tuple[str, object]]:
        """What was held back, once the answer is over."""
        if self.mode == "calls?" and self.pending:
            self.mode = "content"
            return [("content", self.pending)]
        return []
