"""The egpu exception tree. Every failure a user can meet is one of these.

    EgpuError                       root; carries a one-line message for the user
     ├─ UsageError                  bad command-line input (exit code 2)
     ├─ NotFoundError               a named thing (VM, image, device) does not exist
     ├─ ConflictError               the request clashes with current state (name in use, port taken)
     ├─ EngineError                 no usable QEMU, or provisioning it failed
     ├─ GuestError                  built-in guest assets could not be assembled, or a check failed
     ├─ VMError                     starting, watching or stopping a VM failed
     │   ├─ GuestCrashedError       QEMU runs but its guest stopped for good (internal-error, panic)
     │   └─ AgentError              the guest agent did not answer, or answered nonsense
     ├─ HostError                   device discovery failed (malformed dump, unreadable sysfs)
     ├─ ImageError                  OCI pull / cache failure (bad reference, digest mismatch, ...)
 ├─ LlmError                    a model endpoint failed, stalled or streamed nonsense (bench llm)
     └─ DeviceServerError           vfio-user server or device model failure

Low-level errors (OSError, subprocess failures, protocol errors) are re-raised as one of these
at the layer that understands them, so the CLI prints ``error: <message>`` and exits non-zero
without a traceback.
"""

from __future__ import annotations


class EgpuError(Exception):
    """Root of every error egpu reports to a user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(EgpuError):
    """Bad command-line input."""

    exit_code = 2


class NotFoundError(EgpuError):
    """A named VM, image, device or file does not exist."""


class ConflictError(EgpuError):
    """The request clashes with current state (a name or port already in use)."""


class EngineError(EgpuError):
    """No usable QEMU engine, or provisioning one failed."""


class GuestError(EgpuError):
    """Built-in guest assets could not be assembled, or a guest check failed."""


class VMError(EgpuError):
    """Starting, watching or stopping a VM failed."""


class GuestCrashedError(VMError):
    """QEMU came up but its guest stopped for good (internal-error, guest-panicked)."""


class AgentError(VMError):
    """The QEMU guest agent could not be reached, timed out, or sent a malformed reply."""


class HostError(EgpuError):
    """Host device discovery failed (malformed dump, unreadable sysfs)."""


class ImageError(EgpuError):
    """OCI image pull or cache failure."""


class LlmError(EgpuError):
    """A model endpoint failed, stalled, or answered something that is not a completion."""


class DeviceServerError(EgpuError):
    """vfio-user server or device model failure."""
