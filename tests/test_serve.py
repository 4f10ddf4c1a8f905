"""egpu serve, what needs no VM: MODEL resolution against the VM's shares, the exact argv of
both backends (golden), the guest's answers parsed, and bad input refused in one line."""

from __future__ import annotations

import contextlib
import http.server
import json
import shlex
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import InProcessCli
from egpu.engine.shares import Share
from egpu.errors import ConflictError, UsageError
from egpu.progress import SilentProgress
from egpu.vm import serve_guest, serve_plan, serving, store

MODELS = Share("egpu0", Path("/home/u/models"), "/srv/models", readonly=False)
READONLY = Share("egpu1", Path("/data/ro"), "/mnt/ro", readonly=True)
TINY = serve_plan.HostModel(Path("/home/u/models/tiny.gguf"), "/srv/models/tiny.gguf")


# ---- MODEL ----

def test_a_host_file_under_a_share_maps_to_its_guest_path() -> None:
    host = Path("/home/u/models/sub dir/q, 4.gguf")
    model = serve_plan.resolve_model(str(host), host, [READONLY, MODELS], "vm")
    assert model == serve_plan.HostModel(host, "/srv/models/sub dir/q, 4.gguf")


def test_a_host_file_outside_every_share_says_to_mount_its_folder() -> None:
    host = Path("/elsewhere/m.gguf")
    with pytest.raises(UsageError, match="in no folder shared with VM 'vm'") as e:
        serve_plan.resolve_model(str(host), host, [MODELS], "vm")
    assert e.value.hint is not None and "--mount /elsewhere:" in e.value.hint
    # a sibling whose name starts like the share is not under it
    sibling = Path("/home/u/models2/m.gguf")
    with pytest.raises(UsageError, match="in no folder shared"):
        serve_plan.resolve_model(str(sibling), sibling, [MODELS], "vm")


def test_vm_prefix_names_a_file_in_the_guest() -> None:
    assert serve_plan.resolve_model("vm:/opt//m/x.gguf", None, [], "vm") == \
        serve_plan.GuestModel("/opt/m/x.gguf")
    for bad in ("vm:x.gguf", "vm:/opt/../etc/x", "vm:", "vm:/a\nb"):
        with pytest.raises(UsageError):
            serve_plan.resolve_model(bad, None, [], "vm")


@pytest.mark.parametrize("text", ["/no/such.gguf", "./m.gguf", "~/m.gguf", "tiny.gguf",
                                  "models/tiny.gguf"])
def test_a_host_path_that_exists_nowhere_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="no file on this host"):
        serve_plan.resolve_model(text, None, [MODELS], "vm")


def test_hugging_face_ids() -> None:
    def hub(text: str) -> serve_plan.Model:
        return serve_plan.resolve_model(text, None, [], "vm")

    assert hub("Qwen/Qwen3-0.6B-GGUF") == serve_plan.HubModel("Qwen/Qwen3-0.6B-GGUF")
    assert hub("org/repo:Q4_K_M") == serve_plan.HubModel("org/repo", quant="Q4_K_M")
    assert hub("org/repo:sub/m-q8.gguf") == serve_plan.HubModel("org/repo", file="sub/m-q8.gguf")
    for bad in ("org", "org/repo/extra", "org/repo:", "-org/repo", "org/repo:../x.gguf",
                "org/repo:a b", "org/re po"):
        with pytest.raises(UsageError):
            hub(bad)


def test_the_edge_resolves_only_real_host_files(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    link = tmp_path / "link.gguf"
    link.symlink_to(model)
    assert serve_guest.host_file(str(link)) == model.resolve()
    assert serve_guest.host_file(str(tmp_path)) is None  # a directory
    assert serve_guest.host_file(str(tmp_path / "none.gguf")) is None
    assert serve_guest.host_file(f"vm:{model}") is None


# ---- argv (golden) ----

def test_llama_cpp_argv_for_a_shared_host_file() -> None:
    plan = serve_plan.plan("llama.cpp", TINY, 8000, 4096, ["-t", "1", "--no-webui"], [MODELS])
    assert plan.model_name == "tiny"
    assert list(plan.argv) == [
        "systemd-run", "--unit=egpu-serve.service", "--description=egpu serve", "--collect",
        "--expand-environment=no", "--quiet", "--",
        "llama-server", "--host", "0.0.0.0", "--port", "8000", "-m", "/srv/models/tiny.gguf",
        "--alias", "tiny", "-c", "4096", "-t", "1", "--no-webui"]


def test_llama_cpp_argv_for_hugging_face_ids() -> None:
    hub = serve_plan.HubModel("org/repo", file="m-Q8_0.gguf")
    plan = serve_plan.plan("llama.cpp", hub, 9000, None, [], [READONLY, MODELS])
    assert list(plan.argv) == [
        "systemd-run", "--unit=egpu-serve.service", "--description=egpu serve", "--collect",
        "--expand-environment=no", "--quiet",
        "--setenv=HF_HOME=/srv/models/huggingface",
        "--setenv=LLAMA_CACHE=/srv/models/huggingface/llama.cpp", "--",
        "llama-server", "--host", "0.0.0.0", "--port", "9000", "-hf", "org/repo",
        "-hff", "m-Q8_0.gguf", "--alias", "m-Q8_0"]
    quant = serve_plan.plan("llama.cpp", serve_plan.HubModel("org/repo", quant="Q4_K_M"), 9000,
                            None, [], [READONLY])
    # no writable share: the cache stays in the guest
    assert "--setenv=HF_HOME=/var/cache/egpu/huggingface" in quant.argv
    assert quant.argv[-4:] == ("-hf", "org/repo:Q4_K_M", "--alias", "repo:Q4_K_M")


def test_an_alias_in_extra_is_the_served_name() -> None:
    plan = serve_plan.plan("llama.cpp", TINY, 8000, None, ["--alias", "mine,other"], [MODELS])
    assert plan.model_name == "mine"
    assert plan.argv.count("--alias") == 1 and plan.argv[-2:] == ("--alias", "mine,other")
    assert serve_plan.plan("llama.cpp", TINY, 8000, None, ["-a=x"], []).model_name == "x"


def test_vllm_argv_golden() -> None:
    hub = serve_plan.plan("vllm", serve_plan.HubModel("Qwen/Qwen3-0.6B"), 8000, 8192,
                          ["--gpu-memory-utilization", "0.9"], [MODELS])
    assert list(hub.argv) == [
        "docker", "run", "-d", "--name", "egpu-serve", "--log-driver", "journald",
        "--gpus", "all", "--ipc", "host", "-p", "8000:8000",
        "-v", "/srv/models/huggingface:/root/.cache/huggingface",
        "vllm/vllm-openai:latest", "--model", "Qwen/Qwen3-0.6B",
        "--served-model-name", "Qwen3-0.6B", "--max-model-len", "8192",
        "--gpu-memory-utilization", "0.9"]
    local = serve_plan.plan("vllm", TINY, 8100, None, [], [])
    assert list(local.argv) == [
        "docker", "run", "-d", "--name", "egpu-serve", "--log-driver", "journald",
        "--gpus", "all", "--ipc", "host", "-p", "8100:8000",
        "-v", "/var/cache/egpu/huggingface:/root/.cache/huggingface",
        "-v", "/srv/models:/srv/models:ro",
        "vllm/vllm-openai:latest", "--model", "/srv/models/tiny.gguf",
        "--served-model-name", "tiny"]
    with pytest.raises(UsageError, match="org/repo"):
        serve_plan.plan("vllm", serve_plan.HubModel("o/r", file="x.gguf"), 8000, None, [], [])
    colon = serve_plan.GuestModel("/srv/a:b/m.gguf")
    with pytest.raises(UsageError, match="splits at ':'"):
        serve_plan.plan("vllm", colon, 8000, None, [], [])


def test_managing_argv_golden() -> None:
    assert serve_plan.stop_argv("llama.cpp") == ["systemctl", "stop", "egpu-serve.service"]
    assert serve_plan.stop_argv("vllm") == ["docker", "rm", "-f", "egpu-serve"]
    assert serve_plan.logs_argv("llama.cpp", 20) == [
        "journalctl", "-u", "egpu-serve.service", "--no-pager", "--output=cat",
        "--show-cursor", "--lines=20"]
    assert serve_plan.logs_argv("vllm", None, "s=1;i=2")[1:2] == ["CONTAINER_NAME=egpu-serve"]
    assert serve_plan.logs_argv("vllm", None, "s=1;i=2")[-1] == "--after-cursor=s=1;i=2"
    assert serve_plan.is_active("vllm", 0, b"true\n")
    assert not serve_plan.is_active("vllm", 0, b"false\n")
    assert not serve_plan.is_active("llama.cpp", 3, b"")


@pytest.mark.parametrize(("port", "ctx", "extra", "match"), [
    (0, None, [], "--port 0"), (1023, None, [], "--port 1023"), (65536, None, [], "--port"),
    (8000, 0, [], "--ctx 0"), (8000, -1, [], "--ctx -1"), (8000, 1 << 30, [], "--ctx"),
    (8000, None, ["a\nb"], "control character"), (8000, None, ["x" * 5000], "longer"),
    (8000, None, ["x"] * 300, "at most"),
])
def test_bad_values_are_refused(port: int, ctx: int | None, extra: list[str],
                                match: str) -> None:
    with pytest.raises(UsageError, match=match):
        serve_plan.plan("llama.cpp", TINY, port, ctx, extra, [MODELS])


# ---- what the guest and the server answer ----

def test_journal_lines_and_cursor() -> None:
    text = ("main: server is listening on http://0.0.0.0:8000\n\x1b[31mred\x1b[0m\n"
            "-- cursor: s=0a1b;i=2c;b=3d;m=4e;t=5f;x=60\n")
    lines, cursor = serve_plan.parse_journal(text)
    assert lines == ["main: server is listening on http://0.0.0.0:8000", "?[31mred?[0m"]
    assert cursor == "s=0a1b;i=2c;b=3d;m=4e;t=5f;x=60"
    # a cursor that could be read as more than one argument is not taken
    assert serve_plan.parse_journal("-- cursor: a b\n")[1] is None
    assert serve_plan.parse_journal("-- No entries --\n") == ([], None)
    assert len(serve_plan.parse_journal("y" * 5000)[0][0]) == serve_plan.MAX_LOG_LINE


def test_device_from_probes() -> None:
    smi = b"GPU 0: NVIDIA GeForce RTX 5090 (UUID: GPU-1234)\n"
    assert serve_plan.device_from_probes((0, smi), None) == "cuda"
    assert serve_plan.device_from_probes((9, b"NVIDIA-SMI has failed"), None) == "cpu"
    llvmpipe = b"deviceType = PHYSICAL_DEVICE_TYPE_CPU\ndeviceName = llvmpipe\n"
    assert serve_plan.device_from_probes(None, (0, llvmpipe)) == "cpu"
    radv = b"deviceType = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU\ndeviceName = AMD Radeon\n"
    assert serve_plan.device_from_probes(None, (0, radv)) == "vulkan"
    assert serve_plan.device_from_probes(None, (1, radv)) == "cpu"
    assert serve_plan.device_from_probes(None, None) == "cpu"


def test_models_answer_parsing() -> None:
    body = json.dumps({"object": "list", "data": [{"id": "tiny"}, {"id": 3}, "x"]}).encode()
    assert serve_plan.model_ids(body) == ["tiny"]
    for bad in (b"not json", b"[]", b'{"data": {}}', b'{"data": [' + b"1," * 40000 + b"1]}"):
        assert serve_plan.model_ids(bad) is None


def test_ready_request_pastes_into_a_shell() -> None:
    text = serve_plan.ready_request("http://127.0.0.1:8000", "it's")
    argv = shlex.split(text)
    assert argv[:2] == ["curl", "http://127.0.0.1:8000/v1/chat/completions"]
    body = json.loads(argv[argv.index("-d") + 1])
    assert body["model"] == "it's" and body["messages"][0]["role"] == "user"


# ---- the host port ----

def _config(**kw: object) -> store.VmConfig:
    base: dict[str, object] = dict(name="vm", arch="x86_64", cpus=1, memory_mib=2048,
                                   accel="tcg", gpu_path="none", qemu="QEMU", qemu_version="11",
                                   argv=["qemu"])
    return store.VmConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_host_port_is_the_guest_port_and_must_be_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(ConflictError, match=f"host port {busy} is in use .* on 127.0.0.1"):
            serve_guest.host_port(_config(), busy)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert serve_guest.host_port(_config(), free) == free
    assert serve_guest.host_port(_config(ports=[(18001, 8000)]), 8000) == 18001
    with pytest.raises(ConflictError, match="ssh"):
        serve_guest.host_port(_config(ssh_port=free), free)
    with pytest.raises(UsageError, match="without automatic port forwarding"):
        serve_guest.host_port(_config(port_forwarding=False), free)


# ---- the command ----

@pytest.fixture
def vm_dir(egpu_home: Path, tmp_path: Path) -> store.VmDir:
    vm = store.VmDir("vm")
    vm.create()
    vm.write_config(_config(mounts=[Share("egpu0", tmp_path.resolve(), "/srv/models", False)]))
    return vm


@pytest.mark.parametrize(("args", "match"), [
    (["--port", "0"], "--port 0 must be 1024 to 65535"),
    (["--ctx", "-1"], "--ctx -1 must be a positive number"),
    (["--backend", "tgi"], "'tgi' is not one of"),
    (["--timeout", "nan"], "--timeout nan"),
])
def test_bad_input_is_one_line_and_exit_2(inproc: InProcessCli, vm_dir: store.VmDir,
                                          tmp_path: Path, args: list[str], match: str) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    proc = inproc("serve", "vm", str(model), *args)
    assert proc.returncode == 2, proc.stderr
    assert match in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_model_outside_every_share_is_refused(inproc: InProcessCli, vm_dir: store.VmDir,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "m.gguf"
    elsewhere.write_bytes(b"GGUF")
    proc = inproc("serve", "vm", str(elsewhere))
    assert proc.returncode == 2
    assert "in no folder shared with VM 'vm'" in proc.stderr and "--mount" in proc.stderr


def test_stop_on_a_vm_serving_nothing(inproc: InProcessCli, vm_dir: store.VmDir) -> None:
    proc = inproc("serve", "vm", "--stop")
    assert proc.returncode == 1
    assert "serves no model: nothing to stop" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_stop_of_a_stopped_vm_forgets_the_record(inproc: InProcessCli,
                                                 vm_dir: store.VmDir) -> None:
    serving.write(vm_dir, serving.ServeRecord("llama.cpp", 18080, "tiny"))
    proc = inproc("serve", "vm", "--stop", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stopped"] is True
    assert not vm_dir.file(store.SERVE_RECORD).exists()


def test_serving_needs_a_running_vm_and_one_mode(inproc: InProcessCli,
                                                 vm_dir: store.VmDir, tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    proc = inproc("serve", "vm", str(model))
    assert proc.returncode == 1 and "serving needs it running" in proc.stderr
    logs = inproc("serve", "vm", "--logs")
    assert logs.returncode == 1 and "serving needs it running" in logs.stderr
    assert inproc("serve", "vm", "--stop", "--logs").returncode == 2
    assert inproc("serve", "vm", "--logs", "m.gguf").returncode == 2
    assert inproc("serve", "vm", "-f").returncode == 2
    assert inproc("serve", "vm").returncode == 2
    assert inproc("serve", "nosuch", "--stop").returncode == 1


# ---- /v1/models through a real loopback server ----

class _Models(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b""

    def do_GET(self) -> None:
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(type(self).body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(type(self).body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _answering(status: int, body: bytes) -> Iterator[int]:
    handler = type("H", (_Models,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.network
def test_models_answer_from_a_real_server() -> None:
    listing = json.dumps({"object": "list", "data": [{"id": "tiny"}]}).encode()
    with _answering(200, listing) as port:
        assert serve_guest.models_answer(port) == ["tiny"]
    with _answering(503, b'{"error": "Loading model"}') as port:
        assert serve_guest.models_answer(port) is None  # still loading: keep waiting
    with _answering(200, b'{"data": [' + b'{"id": "x"},' * 10000 + b'{"id": "y"}]}') as port:
        assert serve_guest.models_answer(port) is None  # past the cap: not read whole
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nothing = int(s.getsockname()[1])
    assert serve_guest.models_answer(nothing) is None


@pytest.mark.network
def test_a_port_answering_for_another_model_is_a_conflict(egpu_home: Path) -> None:
    vm = store.VmDir("vm")
    vm.create()
    listing = json.dumps({"object": "list", "data": [{"id": "someone-else"}]}).encode()
    plan = serve_plan.plan("llama.cpp", TINY, 8000, None, [], [MODELS])
    with _answering(200, listing) as port, pytest.raises(ConflictError, match="someone-else"):
        serve_guest.wait_ready(vm, plan, port, 30, SilentProgress())
