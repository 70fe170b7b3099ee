"""The only code that differs between a CUDA device and the CPU: allocation, pinned
staging memory, the copy stream and the events that order it against compute.

On the CPU every copy is complete when it returns, so each marker is None and every
wait is a no-op; the rest of lazystream runs the same code on both.
"""

from __future__ import annotations

import torch


class HostDevice:
    """Slots in host memory; copies are synchronous."""

    is_cuda = False

    def __init__(self, device: torch.device):
        self.device = device

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def copy_done(self) -> None:
        return None

    def compute_done(self) -> None:
        return None

    def copy_waits_for(self, marker: None) -> None:
        pass

    def compute_waits_for(self, marker: None) -> None:
        pass

    def host_waits_for(self, marker: None) -> None:
        pass

    def free_bytes(self) -> int | None:
        return None


class CudaDevice:
    """Slots in device memory, filled on a dedicated copy stream from pinned staging."""

    is_cuda = True

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        # Never traced by torch.compile: it runs on the worker thread, or inside the
        # streamer's hooks, which are excluded from graphs.
        # Asynchronous only because src is pinned; the caller keeps src untouched until
        # the marker from copy_done() has completed.
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)

    def copy_done(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        return event

    def compute_done(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy_waits_for(self, marker: torch.cuda.Event | None) -> None:
        # A slot is rewritten only after the kernels that read its previous block finished;
        # without this wait the copy stream would overwrite weights still being read.
        if marker is not None:
            self.copy_stream.wait_event(marker)

    def compute_waits_for(self, marker: torch.cuda.Event | None) -> None:
        # Kernels of a streamed block start only after its bytes have landed; without this
        # wait they would read a half-copied slot. The wait is on the device, not the host.
        if marker is not None:
            torch.cuda.current_stream(self.device).wait_event(marker)

    def host_waits_for(self, marker: torch.cuda.Event | None) -> None:
        # The host refills a pinned staging buffer only after the device has read it;
        # without this the next block's bytes would overwrite an in-flight copy.
        if marker is not None:
            marker.synchronize()

    def free_bytes(self) -> int:
        """Free device memory, counting what this process's allocator holds unused."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)


def device_ops(device: torch.device) -> HostDevice | CudaDevice:
    if device.type == "cuda":
        return CudaDevice(device)
    if device.type == "cpu":
        return HostDevice(device)
    raise ValueError(f"device must be 'cuda' or 'cpu', got {device}")
