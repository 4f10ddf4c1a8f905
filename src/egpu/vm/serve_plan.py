"""``egpu serve``, the pure core: what MODEL names, where it is in the guest, and the exact argv
that starts, stops, watches and reads the logs of the server in the guest.

Everything is an argv list for the guest agent's guest-exec (no shell ever reads it), and
everything a user typed is checked first: the port, the context size, the model (a host file
under one of the VM's shares, ``vm:/PATH`` inside the VM, or a Hugging Face id) and each EXTRA
argument. What the guest sends back (device probes, journal cursors, ``/v1/models``) is
untrusted and parsed here with every length bounded.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from egpu.engine.argv import MAX_PORT
from egpu.engine.shares import Share
from egpu.errors import UsageError
from egpu.vm.ports import FIRST_UNPRIVILEGED_PORT
from egpu.vm.serving import BACKENDS, MAX_MODEL_NAME

DEFAULT_PORT = 8000
MAX_CTX = 1 << 24  # tokens; far above any model's trained context
MAX_EXTRA = 256  # EXTRA arguments
MAX_ARG = 4096  # characters in one EXTRA argument or one model path
GUEST_PREFIX = "vm:"  # MODEL names a file inside the VM
GGUF_SUFFIX = ".gguf"
# The transient unit (llama.cpp) and the container (vllm) share one name: one server per VM,
# and both log to the guest's journal, so --logs and --stop read one place.
UNIT = "egpu-serve.service"
CONTAINER = "egpu-serve"
LLAMA_SERVER = "llama-server"  # Debian's llama.cpp-tools, in the ai image
VLLM_IMAGE = "vllm/vllm-openai:latest"
VLLM_CONTAINER_PORT = 8000  # what the vllm-openai image's server listens on
VLLM_HF_HOME = "/root/.cache/huggingface"  # the image's Hugging Face cache
LISTEN_ALL = "0.0.0.0"  # slirp delivers forwarded connections to the guest's network address
HF_CACHE_DIR = "huggingface"  # under a writable share: survives a reset of the VM's disk
GUEST_HF_CACHE = "/var/cache/egpu/huggingface"  # when the VM shares no writable folder
LOG_LINES = 200  # what --logs shows before following
FAIL_LOG_LINES = 20  # what a failed start shows of the server's log
MAX_LOG_LINE = 1024  # characters of one guest log line kept
MAX_MODELS_BODY = 64 << 10  # bytes of a /v1/models answer read
MAX_MODEL_IDS = 64

# Hugging Face repo ids: "org/name", each part letters, digits, '.', '_' and '-'.
_HF_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HF_REPO = re.compile(rf"{_HF_PART}/{_HF_PART}")
_HF_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # llama.cpp's repo:QUANT tag
_HF_FILE = re.compile(rf"(?:{_HF_PART}/)*{_HF_PART}\.gguf")
# journalctl --show-cursor's last line; the cursor is passed back, so it is checked first
_CURSOR_LINE = re.compile(r"-- cursor: ([A-Za-z0-9=;_-]{1,512})")
_GPU_VULKAN = re.compile(r"PHYSICAL_DEVICE_TYPE_(DISCRETE|INTEGRATED|VIRTUAL)_GPU")
_ALIAS_OPTIONS = ("-a", "--alias")  # llama-server
_SERVED_NAME_OPTION = "--served-model-name"  # vllm


@dataclass(frozen=True)
class HostModel:
    """A GGUF file on the host, seen by the guest through a share at ``guest_path``."""

    host_path: Path
    guest_path: str


@dataclass(frozen=True)
class GuestModel:
    """A file inside the VM."""

    guest_path: str


@dataclass(frozen=True)
class HubModel:
    """A Hugging Face repo, downloaded inside the VM: a quant tag or a file, or neither."""

    repo: str
    quant: str | None = None
    file: str | None = None


Model = HostModel | GuestModel | HubModel


def _check_text(text: str, what: str) -> str:
    if not text or len(text) > MAX_ARG:
        raise UsageError(f"{what} must be 1 to {MAX_ARG} characters")
    if not text.isprintable():
        raise UsageError(f"{what} {text[:60]!r} contains a control character")
    return text


def check_guest_path(path: str, what: str = "the model's path in the VM") -> str:
    """An absolute, plain guest path (no '.' or '..', no control characters), normalised."""
    _check_text(path, what)
    if not path.startswith("/"):
        raise UsageError(f"{what} {path!r} is not absolute", hint="write vm:/PATH")
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise UsageError(f"{what} {path!r} is not a plain file path")
    return "/" + "/".join(parts)


def looks_like_host_path(text: str) -> bool:
    """Whether MODEL was meant as a host file: a path form, or a bare ``*.gguf`` name."""
    return (text.startswith(("/", "./", "../", "~")) or
            (":" not in text and text.endswith(GGUF_SUFFIX)))


def parse_hub(text: str) -> HubModel:
    """``org/repo``, ``org/repo:QUANT`` or ``org/repo:FILE.gguf``; UsageError otherwise."""
    repo, sep, tail = text.partition(":")
    if not _HF_REPO.fullmatch(repo) or (sep and not tail):
        raise UsageError(f"MODEL {text!r} is neither a host file, vm:/PATH nor a Hugging Face "
                         "id org/repo[:file.gguf]")
    if not sep:
        return HubModel(repo)
    if tail.endswith(GGUF_SUFFIX):
        if not _HF_FILE.fullmatch(tail) or ".." in tail.split("/"):
            raise UsageError(f"MODEL {text!r}: {tail!r} is not a plain file name in the repo")
        return HubModel(repo, file=tail)
    if not _HF_QUANT.fullmatch(tail):
        raise UsageError(f"MODEL {text!r}: {tail!r} is neither a quant tag nor a .gguf file")
    return HubModel(repo, quant=tail)


def share_path(host_file: Path, mounts: Sequence[Share]) -> str | None:
    """Where the guest sees ``host_file`` (resolved) through its shares, or None."""
    for share in mounts:
        try:
            rel = host_file.relative_to(share.host)
        except ValueError:
            continue
        return posixpath.join(share.guest, PurePosixPath(*rel.parts).as_posix())
    return None


def resolve_model(text: str, host_file: Path | None, mounts: Sequence[Share],
                  vm_name: str) -> Model:
    """What MODEL names. ``host_file`` is MODEL resolved on the host when it names a file there
    (the edge looks); the rule, first match wins: ``vm:PATH`` is a file in the VM; an existing
    host file must lie under a share (never copied); a path form that exists nowhere on the host
    is an error; anything else must be a Hugging Face id."""
    _check_text(text, "MODEL")
    if text.startswith(GUEST_PREFIX):
        return GuestModel(check_guest_path(text[len(GUEST_PREFIX):]))
    if host_file is not None:
        guest = share_path(host_file, mounts)
        if guest is None:
            raise UsageError(
                f"{host_file} is in no folder shared with VM {vm_name!r}",
                hint=f"stop the VM and run it again with --mount {host_file.parent}:/srv/models")
        return HostModel(host_file, check_guest_path(guest))
    if looks_like_host_path(text):
        raise UsageError(f"MODEL {text!r} is no file on this host",
                         hint=f"a file inside the VM is {GUEST_PREFIX}/PATH")
    return parse_hub(text)


def hf_cache(mounts: Sequence[Share]) -> str:
    """Where a downloaded model goes in the guest: the first writable share, else the guest."""
    for share in mounts:
        if not share.readonly:
            return posixpath.join(share.guest, HF_CACHE_DIR)
    return GUEST_HF_CACHE


def check_port(port: int) -> int:
    """A port the automatic forward takes: 1024 to 65535 (the forwarder leaves lower ones)."""
    if isinstance(port, bool) or not FIRST_UNPRIVILEGED_PORT <= port <= MAX_PORT:
        raise UsageError(f"--port {port} must be {FIRST_UNPRIVILEGED_PORT} to {MAX_PORT}",
                         hint="lower guest ports are never forwarded automatically")
    return port


def check_ctx(ctx: int | None) -> int | None:
    if ctx is not None and (isinstance(ctx, bool) or not 1 <= ctx <= MAX_CTX):
        raise UsageError(f"--ctx {ctx} must be a positive number of tokens (at most {MAX_CTX})")
    return ctx


def check_extra(extra: Sequence[str]) -> tuple[str, ...]:
    """EXTRA arguments, each passed as one argv element: bounded, no control characters."""
    if len(extra) > MAX_EXTRA:
        raise UsageError(f"at most {MAX_EXTRA} EXTRA arguments")
    for arg in extra:
        if len(arg) > MAX_ARG or not arg.isprintable():
            raise UsageError(f"EXTRA argument {arg[:60]!r} is longer than {MAX_ARG} characters "
                             "or contains a control character")
    return tuple(extra)


def _option_value(extra: Sequence[str], names: Sequence[str]) -> str | None:
    """The last value EXTRA gives an option (``--opt V`` or ``--opt=V``), if any."""
    found = None
    for i, arg in enumerate(extra):
        name, eq, value = arg.partition("=")
        if name in names:
            if eq:
                found = value
            elif i + 1 < len(extra):
                found = extra[i + 1]
    return found


def default_name(model: Model) -> str:
    """The name the server answers to: the file's name less .gguf, or the repo's."""
    if isinstance(model, HubModel):
        base = model.repo.split("/")[1] + (f":{model.quant}" if model.quant else "")
        if model.file:
            base = posixpath.basename(model.file).removesuffix(GGUF_SUFFIX)
    else:
        base = posixpath.basename(model.guest_path).removesuffix(GGUF_SUFFIX) or "model"
    # llama-server splits --alias at commas
    return base.replace(",", "_")[:MAX_MODEL_NAME]


@dataclass(frozen=True)
class ServePlan:
    """What ``egpu serve`` runs in the guest, and what the server will answer to."""

    backend: str
    port: int  # in the guest; the host port forwards to it
    model: Model
    model_name: str
    argv: tuple[str, ...]


def _llama_argv(model: Model, port: int, ctx: int | None, extra: Sequence[str], name: str,
                mounts: Sequence[Share]) -> list[str]:
    argv = ["systemd-run", f"--unit={UNIT}", "--description=egpu serve", "--collect",
            # ExecStart would expand $VAR in the arguments otherwise; they are the user's text
            "--expand-environment=no", "--quiet"]
    server = [LLAMA_SERVER, "--host", LISTEN_ALL, "--port", str(port)]
    if isinstance(model, HubModel):
        cache = hf_cache(mounts)
        # this build reads both: HF_HOME for the hub cache layout, LLAMA_CACHE for its own
        argv += [f"--setenv=HF_HOME={cache}", f"--setenv=LLAMA_CACHE={cache}/llama.cpp"]
        server += ["-hf", model.repo + (f":{model.quant}" if model.quant else "")]
        if model.file:
            server += ["-hff", model.file]
    else:
        server += ["-m", model.guest_path]
    if _option_value(extra, _ALIAS_OPTIONS) is None:
        server += ["--alias", name]
    if ctx is not None:
        server += ["-c", str(ctx)]
    return [*argv, "--", *server, *extra]


def _vllm_argv(model: Model, port: int, ctx: int | None, extra: Sequence[str], name: str,
               mounts: Sequence[Share]) -> list[str]:
    cache = hf_cache(mounts)
    argv = ["docker", "run", "-d", "--name", CONTAINER, "--log-driver", "journald",
            "--gpus", "all", "--ipc", "host", "-p", f"{port}:{VLLM_CONTAINER_PORT}",
            "-v", _volume(cache, VLLM_HF_HOME)]
    if isinstance(model, HubModel):
        if model.file or model.quant:
            raise UsageError("--backend vllm takes a Hugging Face repo id org/repo",
                             hint="a single GGUF file of a repo goes through --backend llama.cpp")
        served = model.repo
    else:
        folder = posixpath.dirname(model.guest_path)
        argv += ["-v", _volume(folder, folder, readonly=True)]
        served = model.guest_path
    argv += [VLLM_IMAGE, "--model", served]
    if _option_value(extra, (_SERVED_NAME_OPTION,)) is None:
        argv += [_SERVED_NAME_OPTION, name]
    if ctx is not None:
        argv += ["--max-model-len", str(ctx)]
    return [*argv, *extra]


def _volume(source: str, target: str, *, readonly: bool = False) -> str:
    # docker's -v splits at ':'; such a path cannot be said there
    if ":" in source or ":" in target:
        raise UsageError(f"--backend vllm cannot mount {source!r}: docker -v splits at ':'")
    return f"{source}:{target}" + (":ro" if readonly else "")


def plan(backend: str, model: Model, port: int, ctx: int | None, extra: Sequence[str],
         mounts: Sequence[Share]) -> ServePlan:
    """The server's argv in the guest, every input checked."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: one of {', '.join(BACKENDS)}")
    check_port(port)
    check_ctx(ctx)
    extra = check_extra(extra)
    names = _ALIAS_OPTIONS if backend == "llama.cpp" else (_SERVED_NAME_OPTION,)
    given = _option_value(extra, names)
    name = (given.split(",")[0] if given else default_name(model))[:MAX_MODEL_NAME]
    if not name:
        raise UsageError("the model's name (--alias / --served-model-name) is empty")
    build = _llama_argv if backend == "llama.cpp" else _vllm_argv
    return ServePlan(backend, port, model, name,
                     tuple(build(model, port, ctx, extra, name, mounts)))


# ---- managing the running server (argv) ----

def stop_argv(backend: str) -> list[str]:
    if backend == "vllm":
        return ["docker", "rm", "-f", CONTAINER]
    return ["systemctl", "stop", UNIT]


def active_argv(backend: str) -> list[str]:
    """Exits 0 while the server runs (prints ``true`` for docker)."""
    if backend == "vllm":
        return ["docker", "inspect", "--format", "{{.State.Running}}", CONTAINER]
    return ["systemctl", "is-active", "--quiet", UNIT]


def is_active(backend: str, exit_code: int | None, stdout: bytes) -> bool:
    if exit_code != 0:
        return False
    return backend != "vllm" or stdout.strip() == b"true"


def logs_argv(backend: str, lines: int | None, cursor: str | None = None) -> list[str]:
    """journalctl for the server's log: the last ``lines``, or what came after ``cursor``."""
    match = (f"CONTAINER_NAME={CONTAINER}",) if backend == "vllm" else ("-u", UNIT)
    argv = ["journalctl", *match, "--no-pager", "--output=cat", "--show-cursor"]
    if cursor is not None:
        argv.append(f"--after-cursor={cursor}")
    elif lines is not None:
        argv.append(f"--lines={lines}")
    return argv


def parse_journal(text: str) -> tuple[list[str], str | None]:
    """journalctl's lines (each cut to MAX_LOG_LINE, control characters shown as '?') and the
    cursor from its ``-- cursor:`` line, if it gave a well-formed one."""
    lines, cursor = [], None
    for raw in text.splitlines():
        match = _CURSOR_LINE.fullmatch(raw.strip())
        if match:
            cursor = match.group(1)
            continue
        if raw.strip() == "-- No entries --":
            continue
        lines.append("".join(c if c.isprintable() else "?" for c in raw[:MAX_LOG_LINE]))
    return lines, cursor


# ---- the guest's GPU, and the server's answer ----

NVIDIA_PROBE = ("nvidia-smi", "-L")
VULKAN_PROBE = ("vulkaninfo", "--summary")


def device_from_probes(nvidia: tuple[int | None, bytes] | None,
                       vulkan: tuple[int | None, bytes] | None) -> str:
    """The device the server will use from the probes' exit codes and output (None: the tool
    is missing): CUDA when nvidia-smi lists a GPU, Vulkan for a real Vulkan GPU (llvmpipe is
    the CPU), else the CPU."""
    if nvidia is not None and nvidia[0] == 0 and b"GPU " in nvidia[1][:1 << 16]:
        return "cuda"
    if vulkan is not None and vulkan[0] == 0 and _GPU_VULKAN.search(
            vulkan[1][:1 << 20].decode("ascii", "replace")):
        return "vulkan"
    return "cpu"


def model_ids(body: bytes) -> list[str] | None:
    """The ids a ``/v1/models`` answer lists (OpenAI's ``{"data": [{"id": ...}]}``), or None
    when it is not such an answer."""
    if len(body) > MAX_MODELS_BODY:
        return None
    try:
        doc: Any = json.loads(body)
    except (ValueError, RecursionError):
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    ids = [m["id"] for m in data[:MAX_MODEL_IDS]
           if isinstance(m, dict) and isinstance(m.get("id"), str)]
    return [i[:MAX_MODEL_NAME] for i in ids]


CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"


def ready_request(endpoint: str, model: str) -> str:
    """A ``curl`` chat completion for the served model, ready to paste into a POSIX shell."""
    body = json.dumps({"model": model,
                       "messages": [{"role": "user", "content": "Say hello in one sentence."}]})
    return (f"curl {shlex.quote(endpoint + CHAT_PATH)} -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)}")
