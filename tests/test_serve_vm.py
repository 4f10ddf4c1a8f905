"""``egpu serve`` end to end under TCG: the ``ai`` image (Debian's llama-server) boots with a
host folder shared at /srv/models holding a tiny GGUF model; the model is served from its host
path, answers on the host's 127.0.0.1 through the automatic forward, is measured by
``bench llm``, shows its log and stops. One VM for the module: a first boot costs minutes.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import tiny_gguf
from built_images import (
    AGENT_TIMEOUT_S,
    ARCH,
    BUILD_TIMEOUT_S,
    WORKLOAD,
    built_image,
    wait_for_agent,
)
from conftest import SHARED_CACHE, Cli, _stop_leftovers
from egpu.paths import CACHE_ENV, HOME_ENV
from test_ports_vm import free_port, wait_until

SERVE_TIMEOUT_S = 600  # llama-server's start and the tiny model's load under TCG
pytestmark = [pytest.mark.qemu, pytest.mark.download,
              pytest.mark.timeout(BUILD_TIMEOUT_S + AGENT_TIMEOUT_S + 4 * SERVE_TIMEOUT_S)]
NAME = "vm"
GUEST_MODELS = "/srv/models"
MODEL_NAME = "tiny"  # the file's name less .gguf: what the server answers to
STOP_WAIT_S = 30.0


@dataclass
class Served:
    cli: Cli
    models: Path  # the host folder shared at /srv/models
    port: int = 0


@pytest.fixture(scope="module")
def ai_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image the docker tests boot too: one cached build serves both."""
    return built_image(tmp_path_factory, *WORKLOAD)


@pytest.fixture(scope="module")
def served(ai_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One VM for the module (one vCPU, 2G: x86 guests under multi-threaded TCG can oops)."""
    home = Path(tmp_path_factory.mktemp("h"))
    models = tmp_path_factory.mktemp("models")
    shutil.copyfile(tiny_gguf.tiny_model(), models / f"{MODEL_NAME}.gguf")
    cli = Cli({**os.environ, HOME_ENV: str(home), CACHE_ENV: str(SHARED_CACHE)}, home)
    proc = cli("run", "--name", NAME, "--base", str(ai_image), "--arch", ARCH, "--gpu", "none",
               "--accel", "tcg", "--cpus", "1", "--memory", "2G",
               "--mount", f"{models}:{GUEST_MODELS}", "--detach", "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr
    try:
        wait_for_agent(cli, NAME)
        # the share is mounted by cloud-init's first boot
        wait = cli("exec", NAME, "--timeout", "600", "--", "cloud-init", "status", "--wait",
                   timeout=700)
        assert "done" in wait.stdout, wait.stdout + wait.stderr
        yield Served(cli, models)
    finally:
        cli("stop", NAME, "--force")
        _stop_leftovers(home)


def _models(port: int) -> list[str] | None:
    try:
        resp = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10, trust_env=False)
    except httpx.HTTPError:
        return None
    if resp.status_code != httpx.codes.OK:
        return None
    return [m["id"] for m in resp.json()["data"]]


def test_a_failed_start_shows_the_servers_log_and_records_nothing(served: Served) -> None:
    port = free_port()
    proc = served.cli("serve", NAME, f"vm:{GUEST_MODELS}/missing.gguf", "--port", str(port),
                      "--timeout", str(SERVE_TIMEOUT_S), timeout=SERVE_TIMEOUT_S + 120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ended in the guest before it answered" in proc.stderr, proc.stderr
    # llama-server's own last lines come before the error
    assert "missing.gguf" in proc.stderr.rsplit("error:", 1)[0], proc.stderr
    assert not (served.cli.home / "data/vms" / NAME / "serve.json").exists()


def test_serve_a_host_model_and_query_it_from_the_host(served: Served) -> None:
    served.port = free_port()
    host_model = served.models / f"{MODEL_NAME}.gguf"
    record = json.loads(served.cli(
        "serve", NAME, str(host_model), "--port", str(served.port), "--json",
        "--timeout", str(SERVE_TIMEOUT_S), "--", "-t", "1", "--no-webui",
        timeout=SERVE_TIMEOUT_S + 120, check=True).stdout)
    assert record == {"backend": "llama.cpp", "port": served.port, "model": MODEL_NAME,
                      "device": "cpu", "endpoint": f"http://127.0.0.1:{served.port}"}
    assert _models(served.port) == [MODEL_NAME]
    resp = httpx.post(f"http://127.0.0.1:{served.port}/v1/chat/completions", timeout=120,
                      trust_env=False, json={"model": MODEL_NAME, "max_tokens": 8,
                                             "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == httpx.codes.OK, resp.text
    doc = resp.json()
    assert doc["object"] == "chat.completion"
    (choice,) = doc["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert doc["usage"]["completion_tokens"] >= 1
    forwards = served.cli.json("ports", NAME)["forwards"]
    assert {"host_port": served.port, "guest_port": served.port, "kind": "auto",
            "state": "active", "reason": None} in forwards
    # a second model while one is served is refused before the guest is asked anything
    again = served.cli("serve", NAME, str(host_model), "--port", str(free_port()))
    assert again.returncode == 2 and "already serves 'tiny'" in again.stderr, again.stderr


def test_bench_llm_measures_through_the_served_endpoint(served: Served) -> None:
    assert served.port, "the serve test runs first"
    proc = served.cli("bench", "llm", NAME, "--runs", "1", "--prompt-tokens", "16",
                      "--gen-tokens", "4", "--json", timeout=600, check=True)
    figures = json.loads(proc.stdout)
    assert figures["endpoint"] == f"http://127.0.0.1:{served.port}"
    assert figures["runs"] == 1 and figures["gen_tokens"] >= 1
    assert figures["ttft_s"] > 0 and figures["prefill_tps"] > 0
    assert "blog" not in figures  # no GPU behind this one


def test_logs_show_llama_server_output(served: Served) -> None:
    assert served.port, "the serve test runs first"
    proc = served.cli("serve", NAME, "--logs", check=True, timeout=180)
    assert f"listening on http://0.0.0.0:{served.port}" in proc.stdout, proc.stdout[-2000:]
    # -f prints the same lines, then keeps following until interrupted
    follow = served.cli.popen("serve", NAME, "--logs", "-f", stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        assert follow.stdout is not None
        seen = b""
        deadline = time.monotonic() + 180
        while b"listening on" not in seen:
            assert time.monotonic() < deadline, seen[-2000:]
            ready, _, _ = select.select([follow.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(follow.stdout.fileno(), 65536)
                assert chunk, f"--logs -f ended: {follow.wait()}"
                seen += chunk
        assert follow.poll() is None  # still following
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(60)


def test_stop_ends_the_server_and_the_record(served: Served) -> None:
    assert served.port, "the serve test runs first"
    proc = served.cli("serve", NAME, "--stop", timeout=180)
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: _models(served.port) is None, STOP_WAIT_S, "the endpoint to go quiet")
    bench = served.cli("bench", "llm", NAME, "--runs", "1")
    assert bench.returncode == 1 and "serves no model" in bench.stderr, bench.stderr
    assert served.cli("serve", NAME, "--stop").returncode == 1


def test_extra_arguments_reach_the_server_verbatim(served: Served) -> None:
    # no shell and no systemd expansion between the user and llama-server: '$HOME' and '%n'
    # stay as typed
    port = free_port()
    alias = "$HOME%n"
    record = json.loads(served.cli(
        "serve", NAME, f"vm:{GUEST_MODELS}/{MODEL_NAME}.gguf", "--port", str(port), "--json",
        "--ctx", "512", "--timeout", str(SERVE_TIMEOUT_S), "--", "--alias", alias,
        timeout=SERVE_TIMEOUT_S + 120, check=True).stdout)
    assert record["model"] == alias
    try:
        assert _models(port) == [alias]
        unit = served.cli("exec", NAME, "--", "systemctl", "show", "-p", "ExecStart",
                          "egpu-serve.service", check=True).stdout
        # the user's --alias replaces egpu's, it is not added twice
        assert unit.count("--alias") == 1, unit
        assert f"-m {GUEST_MODELS}/{MODEL_NAME}.gguf -c 512 --alias {alias}" in unit, unit
    finally:
        served.cli("serve", NAME, "--stop", check=True, timeout=180)
