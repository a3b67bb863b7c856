"""The CPU engine's calls in a CUDA stream's order, handed over through two host words.

A hybrid decode step queues, per MoE layer: the copy of the inputs to pinned memory,
then a write of the call's code into the request word and a wait until the done word
holds it (stream memory operations, tandem.gpu.cudart), then a write clearing the done
word and the copy of the output back. GPU work queued between the request and the wait
(a shared expert) runs while the engine computes. The engine's serving thread (the C++ StepMailbox)
polls the request word, runs the call, and answers in the done word. Unlike a host
function, no driver thread runs in between and the GPU resumes by itself, also inside a
CUDA graph.

$TANDEM_GPU_HANDOVER picks `mailbox` (the default where the driver's stream memory
operations work) or `host-function` (cudaLaunchHostFunc).
"""

from __future__ import annotations

import weakref

import torch

from tandem.env_switches import choice
from tandem.errors import TandemError
from tandem.gpu import cudart

HANDOVER_ENV = "TANDEM_GPU_HANDOVER"
HANDOVERS = ("mailbox", "host-function")


class GPUMailbox:
    """One engine's serving thread and the page-locked words a stream talks to it through."""

    def __init__(self, engine):
        self.engine = engine
        self.words = torch.zeros(16, dtype=torch.int32, pin_memory=True)  # request, done; 64 bytes
        self.server = engine.step_mailbox(self.words)
        base = cudart.device_pointer(self.words)
        self.request_word, self.done_word = base, base + 4
        self.request_tensor, self.done_tensor = self.words[0:1], self.words[1:2]  # for kernels

    def add(self, fn_address: int, data_address: int) -> int:
        """Register fn(data); returns the code `queue` requests it by."""
        return int(self.server.add(fn_address, data_address))

    def request(self, code: int) -> None:
        """On the current stream: ask for call `code`; the stream goes on meanwhile."""
        cudart.write_value32(self.request_word, code)

    def wait(self, code: int, clear: bool = True) -> None:
        """On the current stream: wait until call `code` has answered, then clear the answer
        (clear=False: a kernel after the wait clears done_tensor)."""
        cudart.wait_value32(self.done_word, code)
        if clear:
            cudart.write_value32(self.done_word, 0)


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its mailbox


def handover_asked() -> str:
    """$TANDEM_GPU_HANDOVER: mailbox, host-function, or "" (the default)."""
    return choice(HANDOVER_ENV, HANDOVERS, "")


def handover() -> str:
    """The hand-over $TANDEM_GPU_HANDOVER asks for (default: mailbox where it works)."""
    asked = handover_asked()
    if asked == "host-function":
        return asked
    if cudart.stream_memory_ops_work():
        return "mailbox"
    if asked == "mailbox":
        raise TandemError(
            f"{HANDOVER_ENV}=mailbox: this GPU's driver cannot wait on host memory from a stream"
        )
    return "host-function"


def mailbox_of(engine) -> GPUMailbox:
    """The engine's mailbox, made on first use (one per engine, used by one stream at a time)."""
    if engine not in _mailboxes:
        _mailboxes[engine] = GPUMailbox(engine)
    return _mailboxes[engine]
