"""egpu bench llm: the SSE parsing and statistics (pure), the serve record, and the command
against a real llama-server on loopback with a tiny GGUF model, and against hostile servers."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import llama_server
import tiny_gguf
from conftest import Cli, InProcessCli
from egpu.errors import LlmError, NotFoundError, UsageError, VMError
from egpu.vm import llmbench, serving, store

REAL_SERVER = [pytest.mark.network] + ([] if llama_server.is_cached()
                                       else [pytest.mark.download])


# ---- pure ----

def test_sse_lines_split_and_bounded() -> None:
    chunks = [b"data: {\"a\"", b": 1}\r\n\ndata: [DONE]\n"]
    assert list(llmbench.sse_lines(chunks)) == [b'data: {"a": 1}', b"", b"data: [DONE]"]
    with pytest.raises(LlmError, match="longer than"):
        list(llmbench.sse_lines([b"x" * 100], max_line=10))
    with pytest.raises(LlmError, match="longer than"):
        list(llmbench.sse_lines([b"x" * 8, b"x" * 8 + b"\n"], max_line=10))

@pytest.fixture
def cli(inproc: InProcessCli) -> Cli:
    """What these commands decide and print is tested in-process (quick; see InProcessCli)."""
    return inproc



def test_parse_event_fields() -> None:
    line = (b'data: {"choices":[{"delta":{"content":"hi"}}],'
            b'"usage":{"prompt_tokens":12,"completion_tokens":3},'
            b'"timings":{"prompt_n":11,"predicted_n":3}}')
    event = llmbench.parse_event(line)
    assert event == llmbench.Event("hi", (12, 3), (11, 3))
    assert llmbench.parse_event(b": keep-alive") is None
    assert llmbench.parse_event(b"") is None
    done = llmbench.parse_event(b"data: [DONE]")
    assert done is not None and done.done


@pytest.mark.parametrize("line", [b"data: {not json", b"data: [1, 2]",
                                  b'data: {"error": {"message": "model not loaded"}}',
                                  b'data: {"choices": 3}', b'{"error": "no streaming"}'])
def test_parse_event_refuses(line: bytes) -> None:
    with pytest.raises(LlmError):
        llmbench.parse_event(line)


def test_parse_event_ignores_bad_counts() -> None:
    event = llmbench.parse_event(b'data: {"choices":[],"usage":{"prompt_tokens":-1,'
                                 b'"completion_tokens":true}}')
    assert event is not None and event.usage is None


def test_summary_medians() -> None:
    runs = [llmbench.RunFigures(100, 11, t, d, "usage")
            for t, d in ((0.1, 1.0), (0.2, 2.0), (0.5, 0.5))]
    s = llmbench.summarize(runs)
    assert s.ttft_s == 0.2
    assert s.prefill_tps == 500.0
    assert s.decode_tps == 10.0
    assert math.isnan(llmbench.RunFigures(1, 1, 0.1, 0.0, "chunks").decode_tps)
    assert llmbench.blog_prefill_s(4096 / 0.15) == pytest.approx(0.15)


def test_endpoint_loopback_only() -> None:
    assert llmbench.check_endpoint("http://127.0.0.1:8080/", False) == "http://127.0.0.1:8080"
    with pytest.raises(UsageError, match="allow-remote"):
        llmbench.check_endpoint("http://192.0.2.1:8080", False)
    assert llmbench.check_endpoint("http://192.0.2.1:8080", True)
    with pytest.raises(UsageError):
        llmbench.check_endpoint("file:///etc/passwd", True)


def test_prompt_is_about_the_size_asked() -> None:
    prompt = llmbench.build_prompt(1000, 0.25, "n0nce")
    assert prompt.startswith("n0nce ") and abs(len(prompt) - 4006) <= 1


def test_serve_record_round_trip_and_refusals(egpu_home: Path) -> None:
    vm = store.VmDir("sv")
    vm.create()
    with pytest.raises(NotFoundError, match="serves no model"):
        serving.read(vm)
    record = serving.ServeRecord("llama.cpp", 18080, "tiny", "cuda")
    serving.write(vm, record)
    assert serving.read(vm) == record and record.has_gpu
    assert record.endpoint == "http://127.0.0.1:18080"
    for bad in ({"backend": "x", "port": 1, "model": "m"},
                {"backend": "vllm", "port": 0, "model": "m"},
                {"backend": "vllm", "port": True, "model": "m"},
                {"backend": "vllm", "port": 1, "model": ""},
                {"backend": "vllm", "port": 1}, [1]):
        vm.file(store.SERVE_RECORD).write_text(json.dumps(bad))
        with pytest.raises(VMError, match="not a serve record"):
            serving.read(vm)
    assert store.SERVE_RECORD in store.RUNTIME_FILES  # a new run serves nothing until told


# ---- a real llama-server ----

@pytest.fixture(scope="module")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_server.running(tiny_gguf.tiny_model(), log) as url:
        yield url


@pytest.mark.network
def test_tiny_model_is_seeded_and_small() -> None:
    path = tiny_gguf.tiny_model()
    assert path == tiny_gguf.tiny_model()
    assert 400_000 < path.stat().st_size < 600_000


def _real(fn: Callable[..., None]) -> Callable[..., None]:
    for mark in REAL_SERVER:
        fn = mark(fn)
    return fn


@_real
def test_chat_completion_through_loopback_is_openai_shaped(llama_url: str) -> None:
    resp = httpx.post(f"{llama_url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["object"] == "chat.completion"
    (choice,) = doc["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert doc["usage"]["completion_tokens"] >= 1
    assert doc["usage"]["total_tokens"] == (doc["usage"]["prompt_tokens"]
                                            + doc["usage"]["completion_tokens"])


@_real
def test_bench_llm_prints_figures(cli: Cli, llama_url: str) -> None:
    proc = cli("bench", "llm", "--endpoint", llama_url, "--prompt-tokens", "256",
               "--gen-tokens", "16", "--runs", "2", check=True)
    for label in ("time to first token", "prefill (", "decode", "tok/s", "ms"):
        assert label in proc.stdout, proc.stdout
    assert "blog" not in proc.stdout  # no GPU behind this endpoint


@_real
def test_bench_llm_json_through_a_vm_record(cli: Cli, llama_url: str) -> None:
    vm = store.VmDir("served", root=cli.home / "data" / "vms")
    vm.create()
    port = int(llama_url.rsplit(":", 1)[1])
    serving.write(vm, serving.ServeRecord("llama.cpp", port, "tiny", "cuda"))
    doc = json.loads(cli("bench", "llm", "served", "--json", "--prompt-tokens", "512",
                         "--gen-tokens", "8", "--runs", "1", check=True).stdout)
    assert doc["runs"] == 1 and doc["counted_by"] == "timings"
    assert doc["gen_tokens"] == 8  # ignore_eos: exactly what was asked
    assert 256 <= doc["prompt_tokens"] <= 1024  # about the size asked, by /tokenize
    assert doc["ttft_s"] > 0 and doc["prefill_tps"] > 0 and doc["decode_tps"] > 0
    assert doc["blog"] == {"decode_tps": 155.0, "prefill_4k_s": 0.15}


# ---- hostile servers ----

class _Handler(http.server.BaseHTTPRequestHandler):
    body: Callable[[_Handler], None]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == llmbench.TOKENIZE_PATH:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        with contextlib.suppress(OSError):
            type(self).body(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(body: Callable[[_Handler], None]) -> Iterator[str]:
    handler = type("H", (_Handler,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _garbage(h: _Handler) -> None:
    h.wfile.write(b"data: \x00\xff not json\n\n")


def _endless_keepalive(h: _Handler) -> None:
    while True:
        h.wfile.write(b": ping\n")
        h.wfile.flush()


def _endless_chunks(h: _Handler) -> None:
    while True:
        h.wfile.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')


def _no_done(h: _Handler) -> None:
    h.wfile.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')


def _huge_line(h: _Handler) -> None:
    h.wfile.write(b"data: " + b"x" * (llmbench.MAX_LINE + 10))


@pytest.mark.network
@pytest.mark.parametrize(("body", "message"), [
    (_garbage, "not JSON"),
    (_endless_keepalive, "did not end within 2 s"),
    (_endless_chunks, "more than"),
    (_no_done, "without its final"),
    (_huge_line, "longer than"),
])
def test_hostile_stream_fails_in_one_line(cli: Cli, body: Callable[[_Handler], None],
                                          message: str) -> None:
    with _serving(body) as url:
        proc = cli("bench", "llm", "--endpoint", url, "--prompt-tokens", "8", "--gen-tokens",
                   "4", "--runs", "1", "--timeout", "2", timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]


@pytest.mark.parametrize("args", [("--endpoint", "http://192.0.2.1:1"), (),
                                  ("x", "--endpoint", "http://127.0.0.1:1"),
                                  ("--endpoint", "http://127.0.0.1:1", "--timeout", "nan")])
def test_bad_arguments_exit_2(cli: Cli, args: tuple[str, ...]) -> None:
    proc = cli("bench", "llm", *args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
