"""``egpu bench llm``: time to first token, prefill and decode rates of an OpenAI-compatible
chat completions endpoint, streamed (``stream: true``, server-sent events).

The pure half parses SSE ``data:`` lines and chunks and computes the figures; the edge is one
httpx streaming request per run. The server is untrusted: every line is capped in size, the
events in count, the whole run in time, and each field is type-checked before use.
"""

from __future__ import annotations

import json
import math
import secrets
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from egpu.errors import LlmError, UsageError

CHAT_PATH = "/v1/chat/completions"
TOKENIZE_PATH = "/tokenize"  # llama-server's; other servers answer 404 and are estimated
SSE_DATA = b"data:"
SSE_DONE = b"[DONE]"
MAX_LINE = 1 << 20  # one SSE line; a longer one is not a chunk
EVENT_SLACK = 256  # role, usage and keep-alive events beyond one per generated token
MAX_TOKENS = 1 << 20
MAX_RUNS = 100
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0  # silence between two bytes of a stream
DEFAULT_RUN_TIMEOUT_S = 600.0  # a whole run: prefill plus decode
FILLER = "the quick brown fox jumps over the lazy dog "  # the prompt's repeated text
CHARS_PER_TOKEN_GUESS = 4.0  # when the server cannot tokenize for us
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# scottjg.com, "RTX 5090 + M4 MacBook Air: Can it Game?" (2026-05-05): vLLM serving
# Qwen 3.6 35B-A3B through the eGPU
BLOG_DECODE_TPS = 155.0
BLOG_PREFILL_TOKENS = 4096
BLOG_PREFILL_S = 0.150


@dataclass(frozen=True)
class RunFigures:
    """One measured run; counts come from the server when it says (usage/timings)."""

    prompt_tokens: int
    gen_tokens: int
    ttft_s: float  # request sent to first generated text, as the client sees it
    decode_s: float  # first generated text to the last
    counted_by: str  # "timings" | "usage" | "chunks"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else math.inf

    @property
    def decode_tps(self) -> float:
        # the first token arrives with the prefill; the rate is over the ones after it
        after_first = self.gen_tokens - 1
        if after_first <= 0 or self.decode_s <= 0:
            return math.nan
        return after_first / self.decode_s


@dataclass(frozen=True)
class Summary:
    """Medians over runs."""

    runs: int
    prompt_tokens: int
    gen_tokens: int
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    counted_by: str

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def summarize(runs: Sequence[RunFigures]) -> Summary:
    """Medians of each figure over ``runs`` (at least one)."""
    if not runs:
        raise ValueError("no runs to summarize")
    decode = [r.decode_tps for r in runs if math.isfinite(r.decode_tps)]
    return Summary(
        runs=len(runs),
        prompt_tokens=int(statistics.median(r.prompt_tokens for r in runs)),
        gen_tokens=int(statistics.median(r.gen_tokens for r in runs)),
        ttft_s=statistics.median(r.ttft_s for r in runs),
        prefill_tps=statistics.median(r.prefill_tps for r in runs),
        decode_tps=statistics.median(decode) if decode else math.nan,
        counted_by=runs[-1].counted_by,
    )


def blog_prefill_s(prefill_tps: float) -> float:
    """This endpoint's time for the blog's 4k-token prefill, at the measured rate."""
    return BLOG_PREFILL_TOKENS / prefill_tps if prefill_tps > 0 else math.inf


# ---- SSE (pure) ----

def sse_lines(chunks: Iterable[bytes], max_line: int = MAX_LINE) -> Iterator[bytes]:
    """Lines of a byte stream, each at most ``max_line`` bytes (LlmError past it)."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while (end := buf.find(b"\n")) >= 0:
            line = bytes(buf[:end]).rstrip(b"\r")
            del buf[:end + 1]
            if len(line) > max_line:
                raise LlmError(f"the server sent a line longer than {max_line} bytes")
            yield line
        if len(buf) > max_line:
            raise LlmError(f"the server sent a line longer than {max_line} bytes")
    if buf:
        yield bytes(buf).rstrip(b"\r")


@dataclass(frozen=True)
class Event:
    """What one ``data:`` chunk carries for the measurement."""

    text: str  # generated text in this chunk (content or reasoning)
    usage: tuple[int, int] | None  # (prompt_tokens, completion_tokens)
    timings: tuple[int, int] | None  # llama-server's (prompt_n, predicted_n)
    done: bool = False


def _count(doc: Mapping[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return None


def _pair(doc: object, a: str, b: str) -> tuple[int, int] | None:
    if not isinstance(doc, dict):
        return None
    x, y = _count(doc, a), _count(doc, b)
    return None if x is None or y is None else (x, y)


def parse_event(line: bytes) -> Event | None:
    """One SSE line: None for comments, blank lines and fields other than data."""
    if not line.startswith(SSE_DATA):
        if line.startswith(b"{"):
            # a JSON body where events were expected: the server's error, not a stream
            raise LlmError(f"the server answered without streaming: {_snippet(line)}")
        return None
    payload = line[len(SSE_DATA):].strip()
    if payload == SSE_DONE:
        return Event("", None, None, done=True)
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise LlmError(f"the server streamed something that is not JSON: {_snippet(payload)}"
                       ) from None
    if not isinstance(doc, dict):
        raise LlmError("the server streamed a chunk that is not an object")
    if "error" in doc:
        err = doc["error"]
        message = err.get("message") if isinstance(err, dict) else err
        raise LlmError(f"the server reported an error: {_snippet(str(message).encode())}")
    choices = doc.get("choices", [])
    if not isinstance(choices, list):
        raise LlmError("the server streamed a chunk whose 'choices' is not a list")
    text = ""
    for choice in choices[:1]:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict):
            for key in ("content", "reasoning_content"):
                if isinstance(delta.get(key), str):
                    text += delta[key]
    return Event(text, _pair(doc.get("usage"), "prompt_tokens", "completion_tokens"),
                 _pair(doc.get("timings"), "prompt_n", "predicted_n"))


def _snippet(data: bytes) -> str:
    text = data[:80].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


# ---- the edge ----

def check_endpoint(url: str, allow_remote: bool) -> str:
    """An http(s) base URL, loopback unless ``allow_remote``; its trailing '/' removed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--endpoint {url!r} must be an http:// or https:// URL")
    if parts.hostname not in LOOPBACK_HOSTS and not allow_remote:
        raise UsageError(f"--endpoint {url!r} is not on this machine (127.0.0.1)",
                         hint="pass --allow-remote to measure a server elsewhere")
    return url.rstrip("/")


def build_prompt(tokens: int, tokens_per_char: float, nonce: str) -> str:
    """About ``tokens`` tokens of filler; a nonce first, so no prefix cache holds it."""
    chars = max(1, round(tokens / tokens_per_char)) if tokens_per_char > 0 else tokens * 4
    body = (FILLER * (chars // len(FILLER) + 1))[:chars]
    return f"{nonce} {body}"


class Endpoint:
    """One OpenAI-compatible server."""

    def __init__(self, base: str, model: str | None = None,
                 run_timeout: float = DEFAULT_RUN_TIMEOUT_S) -> None:
        self.base = base
        self.model = model
        self.run_timeout = run_timeout
        self.client = httpx.Client(timeout=httpx.Timeout(READ_TIMEOUT_S,
                                                         connect=CONNECT_TIMEOUT_S),
                                   follow_redirects=False, trust_env=False)

    def close(self) -> None:
        self.client.close()

    def tokens_per_char(self) -> float:
        """How many tokens the server's tokenizer makes of the filler, per character."""
        sample = FILLER * 16
        try:
            resp = self.client.post(f"{self.base}{TOKENIZE_PATH}", json={"content": sample})
            doc = resp.json() if resp.status_code == httpx.codes.OK else None
        except (httpx.HTTPError, ValueError):
            doc = None
        tokens = doc.get("tokens") if isinstance(doc, dict) else None
        if isinstance(tokens, list) and 0 < len(tokens) <= MAX_TOKENS:
            return len(tokens) / len(sample)
        return 1 / CHARS_PER_TOKEN_GUESS

    def run(self, prompt: str, gen_tokens: int) -> RunFigures:
        """One streamed completion, timed."""
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": gen_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0,
            # the same amount of decoding every run, and no prompt cache between runs
            # (llama-server and vLLM read these; others ignore them)
            "ignore_eos": True, "cache_prompt": False,
        }
        if self.model:
            body["model"] = self.model
        max_events = gen_tokens + EVENT_SLACK
        start = time.monotonic()
        deadline = start + self.run_timeout
        first = last = None
        chunks = 0
        usage = timings = None
        done = False
        try:
            with self.client.stream("POST", f"{self.base}{CHAT_PATH}", json=body) as resp:
                if resp.status_code != httpx.codes.OK:
                    raise LlmError(f"{self.base}{CHAT_PATH} answered HTTP {resp.status_code}: "
                                   f"{_snippet(resp.read()[:MAX_LINE])}")
                events = 0
                for line in sse_lines(resp.iter_raw()):
                    now = time.monotonic()
                    if now > deadline:
                        raise LlmError(f"the completion did not end within "
                                       f"{self.run_timeout:g} s")
                    event = parse_event(line)
                    if event is None:
                        continue
                    events += 1
                    if events > max_events:
                        raise LlmError(f"the server streamed more than {max_events} events "
                                       f"for {gen_tokens} tokens")
                    if event.done:
                        done = True
                        break
                    if event.text:
                        chunks += 1
                        first = first if first is not None else now
                        last = now
                    usage = event.usage or usage
                    timings = event.timings or timings
        except httpx.TimeoutException:
            raise LlmError(f"{self.base} stopped sending for {READ_TIMEOUT_S:g} s") from None
        except httpx.HTTPError as e:
            raise LlmError(f"cannot reach {self.base}: {e}") from None
        if not done:
            raise LlmError("the stream ended without its final 'data: [DONE]'")
        if first is None or last is None:
            raise LlmError("the server streamed no generated text")
        prompt_n, gen_n, source = 0, chunks, "chunks"
        if usage is not None:
            prompt_n, gen_n, source = usage[0], usage[1], "usage"
        if timings is not None:
            prompt_n, gen_n, source = timings[0], timings[1], "timings"
        return RunFigures(prompt_tokens=prompt_n, gen_tokens=gen_n, ttft_s=first - start,
                          decode_s=last - first, counted_by=source)


def measure(endpoint: Endpoint, prompt_tokens: int, gen_tokens: int, runs: int,
            advance: Any = None) -> Summary:
    """``runs`` runs at this prompt size, medians; ``advance()`` after each run."""
    per_char = endpoint.tokens_per_char()
    results = []
    for _ in range(runs):
        prompt = build_prompt(prompt_tokens, per_char, secrets.token_hex(8))
        results.append(endpoint.run(prompt, gen_tokens))
        if advance is not None:
            advance()
    return summarize(results)
