"""What a VM serves: the record ``egpu serve`` writes (``serve.json`` in the VM directory) and
``egpu bench llm NAME`` reads to find the forwarded endpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from egpu.errors import NotFoundError, VMError
from egpu.vm import store

BACKENDS = ("llama.cpp", "vllm")
DEVICES = ("cpu", "cuda", "rocm", "vulkan")  # where the model runs in the guest
MAX_MODEL_NAME = 256
MAX_RECORD = 64 << 10
PORT_RANGE = (1, 65535)


@dataclass(frozen=True)
class ServeRecord:
    """One served model: its backend, the host port on 127.0.0.1 forwarding to it, the model
    name the server answers to, and the device it runs on."""

    backend: str
    port: int
    model: str
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}")
        if (isinstance(self.port, bool) or not isinstance(self.port, int)
                or not PORT_RANGE[0] <= self.port <= PORT_RANGE[1]):
            raise ValueError("port must be an integer from 1 to 65535")
        if not isinstance(self.model, str) or not 0 < len(self.model) <= MAX_MODEL_NAME:
            raise ValueError(f"model must be a name of 1 to {MAX_MODEL_NAME} characters")

    @property
    def endpoint(self) -> str:
        # port forwards bind loopback only, so this is the one address to use
        return f"http://127.0.0.1:{self.port}"

    @property
    def has_gpu(self) -> bool:
        return self.device != "cpu"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> ServeRecord:
        if not isinstance(data, dict):
            raise ValueError("the serve record is not an object")
        try:
            return cls(backend=data["backend"], port=data["port"], model=data["model"],
                       device=data.get("device", "cpu"))
        except KeyError as e:
            raise ValueError(f"the serve record lacks {e.args[0]!r}") from None


def write(vm: store.VmDir, record: ServeRecord) -> None:
    """Record what the VM serves (atomically)."""
    store.write_json(vm.file(store.SERVE_RECORD), record.to_json())


def read(vm: store.VmDir) -> ServeRecord:
    """What the VM serves; NotFoundError when nothing is served."""
    path = vm.file(store.SERVE_RECORD)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_RECORD + 1)
    except FileNotFoundError:
        raise NotFoundError(f"VM {vm.name!r} serves no model",
                            hint=f"start one with egpu serve {vm.name}, or pass --endpoint URL"
                            ) from None
    except OSError as e:
        raise VMError(f"cannot read {path}: {e.strerror}") from e
    try:
        if len(raw) > MAX_RECORD:
            raise ValueError("larger than 64 KiB")
        return ServeRecord.from_json(json.loads(raw))
    except (ValueError, RecursionError) as e:
        raise VMError(f"{path} is not a serve record: {e}",
                      hint=f"serve the model again: egpu serve {vm.name}") from None
