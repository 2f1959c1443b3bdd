"""Moving a request's KV blocks from a prefill worker to a decode worker, directly.

One interface, two backends. Each transfer names a *channel* (sender, receiver, generation):
both ends build the channel's communicator lazily on first use and drop it after a failure,
so the next attempt (under a new generation) starts from a fresh one.

- `gloo`: a two-rank torch `ProcessGroupGloo` per channel, rendezvousing through a TCPStore
  that the sending worker hosts. Not `ray.util.collective`'s GLOO backend: that one binds the
  process's single default torch process group to the first group it joins, so a worker
  could never talk to a second peer (see DESIGN.md, Decisions).
- `nccl`: `ray.util.collective` NCCL groups (CuPy), one per channel, when both ends hold GPUs.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import threading

import torch

from pdserve.roles.kv_channel import Channel, Endpoint, TransferError
from pdserve.roles.kv_channel import transfer_tag as transfer_tag  # callers import it from here too

BACKENDS = ("gloo", "nccl")


class KVTransport(abc.ABC):
    """Sends and receives KV tensors over per-channel communicators; one per worker."""

    backend: str

    def __init__(self, worker_id: str, host: str = "127.0.0.1") -> None:
        self.worker_id = worker_id
        self.host = host

    @property
    @abc.abstractmethod
    def endpoint(self) -> Endpoint:
        """What peers need to open a channel with this worker."""

    def send(self, channel: Channel, tensor: torch.Tensor, timeout_s: float, tag: int = 0) -> None:
        """Blocks until `tensor` has been handed to the receiver; raises TransferError.

        Several transfers may share a channel at once; the receiver tells them apart by `tag`
        (see `transfer_tag`), so both ends must pass the same one.
        """
        self._transfer(channel, 0, tensor, timeout_s, tag)

    def recv(self, channel: Channel, out: torch.Tensor, timeout_s: float, tag: int = 0) -> None:
        """Blocks until `out` holds what the sender sent with `tag`; raises TransferError."""
        self._transfer(channel, 1, out, timeout_s, tag)

    def _transfer(
        self, channel: Channel, rank: int, tensor: torch.Tensor, timeout_s: float, tag: int
    ) -> None:
        self._check_tensor(tensor)  # the caller's mistake: a ValueError, and the channel stays
        try:
            self._run(channel, rank, tensor, timeout_s, tag)
        except Exception as e:
            # The communicator may be half-way through a message: never reuse it.
            self._drop(channel)
            raise TransferError(f"{'send' if rank == 0 else 'recv'} on {channel.name} failed: {e}") from e

    @abc.abstractmethod
    def _check_tensor(self, tensor: torch.Tensor) -> None:
        """Raises ValueError when this backend cannot move `tensor`."""

    @abc.abstractmethod
    def _run(self, channel: Channel, rank: int, tensor: torch.Tensor, timeout_s: float, tag: int) -> None:
        """One transfer as sender (rank 0) or receiver (rank 1); raises whatever went wrong."""

    @abc.abstractmethod
    def _drop(self, channel: Channel) -> None:
        """Forgets a channel's communicator after a failure; the next transfer builds a new one."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases every communicator."""


class GlooTransport(KVTransport):
    """CPU tensors over torch's Gloo, one two-rank process group per channel (sender is rank 0)."""

    backend = "gloo"

    def __init__(self, worker_id: str, host: str = "127.0.0.1") -> None:
        import torch.distributed as dist

        super().__init__(worker_id, host)
        self._dist = dist
        # Port 0: the OS picks a free port; peers learn it from `endpoint`.
        self._store = dist.TCPStore(
            host, 0, None, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False
        )
        self._groups: dict[str, object] = {}
        self._lock = threading.Lock()
        self._creating: dict[str, threading.Lock] = {}

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.worker_id, self.host, self._store.port)

    def _group(self, channel: Channel, rank: int, timeout_s: float):
        with self._lock:
            creating = self._creating.setdefault(channel.name, threading.Lock())
        # One rendezvous per channel and side, however many transfers start on it at once.
        with creating:
            with self._lock:
                group = self._groups.get(channel.name)
            if group is None:
                group = self._create(channel, rank, timeout_s)
                with self._lock:
                    self._groups[channel.name] = group
            return group

    def _create(self, channel: Channel, rank: int, timeout_s: float):
        dist = self._dist
        timeout = datetime.timedelta(seconds=timeout_s)
        if rank == 0:
            store = self._store
        else:
            store = dist.TCPStore(
                channel.sender.host, channel.sender.store_port, None, False, timeout=timeout
            )
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        # Bind to the address we were given, not whatever the hostname resolves to.
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
        return dist.ProcessGroupGloo(dist.PrefixStore(channel.name, store), rank, 2, options)

    def _check_tensor(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("gloo transfers take contiguous CPU tensors")

    def _run(self, channel: Channel, rank: int, tensor: torch.Tensor, timeout_s: float, tag: int) -> None:
        group = self._group(channel, rank, timeout_s)
        work = group.send([tensor], 1, tag) if rank == 0 else group.recv([tensor], 0, tag)
        work.wait(datetime.timedelta(seconds=timeout_s))

    def _drop(self, channel: Channel) -> None:
        with self._lock:
            self._groups.pop(channel.name, None)

    def close(self) -> None:
        with self._lock:
            self._groups.clear()


class NcclTransport(KVTransport):
    """GPU tensors over NCCL (CuPy) through `ray.util.collective`, one group per channel.

    Must run inside a Ray actor that holds a GPU. NCCL point-to-point has no tags and is
    first-in first-out per communicator, so each transfer on a channel is a header
    (tag, numel) then the data, one at a time per side; a receiver that meets another
    transfer's header first parks that data until its own `recv` asks for it. NCCL calls
    cannot be cancelled, so a timeout is enforced by waiting on a helper thread and then
    destroying the group.
    """

    backend = "nccl"

    def __init__(self, worker_id: str, host: str = "127.0.0.1") -> None:
        import ray.util.collective as collective

        super().__init__(worker_id, host)
        self._col = collective
        self._groups: set[str] = set()
        self._lock = threading.Lock()
        self._channel_locks: dict[str, threading.Lock] = {}
        self._parked: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.worker_id, self.host, 0)

    def _channel_lock(self, channel: Channel) -> threading.Lock:
        with self._lock:
            return self._channel_locks.setdefault(channel.name, threading.Lock())

    def _ensure(self, channel: Channel, rank: int) -> None:
        with self._lock:
            if channel.name in self._groups:
                return
        self._col.init_collective_group(2, rank, backend="nccl", group_name=channel.name)
        with self._lock:
            self._groups.add(channel.name)

    def _send_locked(self, channel: Channel, tensor: torch.Tensor, tag: int) -> None:
        header = torch.tensor([tag, tensor.numel()], dtype=torch.int64, device=tensor.device)
        self._col.send(header, 1, channel.name)
        self._col.send(tensor, 1, channel.name)

    def _recv_locked(self, channel: Channel, out: torch.Tensor, tag: int) -> None:
        parked = self._parked.pop((channel.name, tag), None)
        while parked is None:
            header = torch.empty(2, dtype=torch.int64, device=out.device)
            self._col.recv(header, 0, channel.name)
            got_tag, numel = (int(v) for v in header.tolist())
            if got_tag == tag:
                if numel != out.numel():
                    raise ValueError(f"sender sent {numel} elements, receiver expects {out.numel()}")
                self._col.recv(out, 0, channel.name)
                return
            other = torch.empty(numel, dtype=out.dtype, device=out.device)
            self._col.recv(other, 0, channel.name)
            self._parked[(channel.name, got_tag)] = other
        out.view(-1).copy_(parked)

    def _check_tensor(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cuda":
            raise ValueError("nccl transfers take CUDA tensors")

    def _run(self, channel: Channel, rank: int, tensor: torch.Tensor, timeout_s: float, tag: int) -> None:
        error: list[BaseException] = []

        def work() -> None:
            try:
                with self._channel_lock(channel):
                    self._ensure(channel, rank)
                    if rank == 0:
                        self._send_locked(channel, tensor, tag)
                    else:
                        self._recv_locked(channel, tensor, tag)
                    torch.cuda.current_stream(tensor.device).synchronize()
            except BaseException as e:
                error.append(e)

        thread = threading.Thread(target=work, daemon=True, name=f"nccl-{channel.name}")
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"timed out after {timeout_s} s")
        if error:
            raise error[0]

    def _drop(self, channel: Channel) -> None:
        with self._lock:
            if channel.name not in self._groups:
                return
            self._groups.discard(channel.name)
        # The group may be half-built; there is nothing more to release then.
        with contextlib.suppress(Exception):
            self._col.destroy_collective_group(channel.name)
        with self._lock:
            for key in [k for k in self._parked if k[0] == channel.name]:
                del self._parked[key]

    def close(self) -> None:
        for name in list(self._groups):
            with contextlib.suppress(Exception):
                self._col.destroy_collective_group(name)
        self._groups.clear()


def make_transport(backend: str, worker_id: str, host: str = "127.0.0.1") -> KVTransport:
    """The transport for `backend` ("gloo" or "nccl")."""
    if backend == "gloo":
        return GlooTransport(worker_id, host)
    if backend == "nccl":
        return NcclTransport(worker_id, host)
    raise ValueError(f"kv transfer backend must be one of {BACKENDS}, got {backend!r}")
