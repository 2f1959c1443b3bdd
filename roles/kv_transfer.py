"""Moving a request's KV blocks from a prefill worker to a decode worker, directly.

One interface, two backends. Each transfer names a *channel* (sender, receiver, generation):
both ends build the channel's communicator lazily on first use, and many transfers share it
(told apart by tags). A transfer that fails closes the channel on its end for good: no new
transfer uses it, its communicator (sockets, threads) goes as soon as the transfers still on it
end, and the name is never built again (its rendezvous keys are spent). The router then moves
the pair to the next generation and closes the old one on both ends (`close_channel`); the
controller closes every channel with a dead worker (`close_peer`). A client's cancel is not a
transfer failure and closes nothing.

- `gloo`: a two-rank torch `ProcessGroupGloo` per channel, rendezvousing through a TCPStore
  that the sending worker hosts, all on one Gloo device (one listening socket and event loop
  thread per worker, not per channel). Not `ray.util.collective`'s GLOO backend: that one binds
  the process's single default torch process group to the first group it joins, so a worker
  could never talk to a second peer (see DESIGN.md, Decisions).
- `nccl`: `ray.util.collective` NCCL groups (CuPy), one per channel, when both ends hold GPUs.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import socket
import threading
import traceback

import torch

from pdserve.roles.kv_channel import Channel, Endpoint, TransferError
from pdserve.roles.kv_channel import transfer_tag as transfer_tag  # callers import it from here too

BACKENDS = ("gloo", "nccl")


class KVTransport(abc.ABC):
    """Sends and receives KV tensors over per-channel communicators; one per worker.

    The base class keeps the books: the open channels and their communicators (`_open`), and
    the names closed for good (`_closed`); a backend builds, uses and releases communicators.
    """

    backend: str

    def __init__(self, worker_id: str, host: str = "127.0.0.1") -> None:
        self.worker_id = worker_id
        self.host = host
        self._lock = threading.Lock()
        self._open: dict[str, tuple[Channel, object]] = {}
        self._closed: set[str] = set()

    @property
    @abc.abstractmethod
    def endpoint(self) -> Endpoint:
        """What peers need to open a channel with this worker."""

    @property
    def open_channels(self) -> int:
        """Channels with a communicator on this end (each holds sockets and threads)."""
        with self._lock:
            return len(self._open)

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
            self.close_channel(channel)
            # The failed attempt's frames hold the communicator: let it go now, not with the error.
            traceback.clear_frames(e.__traceback__)
            raise TransferError(f"{'send' if rank == 0 else 'recv'} on {channel.name} failed: {e}") from e

    def close_channel(self, channel: Channel) -> None:
        """Closes `channel` on this end for good: it is never built again (use a new generation)."""
        with self._lock:
            self._closed.add(channel.name)
            entry = self._open.pop(channel.name, None)
        self._release(channel, None if entry is None else entry[1])

    def close_peer(self, worker_id: str) -> int:
        """Closes every channel whose other end is `worker_id` (a dead worker); returns how many."""
        with self._lock:
            gone = [
                c for c, _ in self._open.values() if worker_id in (c.sender.worker_id, c.receiver.worker_id)
            ]
        for channel in gone:
            self.close_channel(channel)
        return len(gone)

    def close(self) -> None:
        """Releases every communicator."""
        with self._lock:
            entries = list(self._open.values())
        for channel, _ in entries:
            self.close_channel(channel)

    def _check_open(self, channel: Channel) -> None:
        """Raises when `channel` was closed; call with `_lock` held."""
        if channel.name in self._closed:
            raise TransferError(f"{channel.name} was closed after a failed transfer; use the next generation")

    def _register(self, channel: Channel, communicator: object) -> bool:
        """Records a communicator just built; False (and nothing kept) when the channel closed meanwhile."""
        with self._lock:
            if channel.name in self._closed:
                return False
            self._open[channel.name] = (channel, communicator)
            return True

    @abc.abstractmethod
    def _check_tensor(self, tensor: torch.Tensor) -> None:
        """Raises ValueError when this backend cannot move `tensor`."""

    @abc.abstractmethod
    def _run(self, channel: Channel, rank: int, tensor: torch.Tensor, timeout_s: float, tag: int) -> None:
        """One transfer as sender (rank 0) or receiver (rank 1); raises whatever went wrong."""

    @abc.abstractmethod
    def _release(self, channel: Channel, communicator: object | None) -> None:
        """Frees a closed channel's communicator (None: it was never built, or only half)."""


class GlooTransport(KVTransport):
    """CPU tensors over torch's Gloo, one two-rank process group per channel (sender is rank 0)."""

    backend = "gloo"

    def __init__(self, worker_id: str, host: str = "127.0.0.1") -> None:
        import torch.distributed as dist

        super().__init__(worker_id, host)
        self._dist = dist
        # The store's server would listen on every interface whatever `host` says: it gets a
        # socket we bound to `host` instead. Port 0: the OS picks; peers learn it from `endpoint`.
        self._listener = _listening_socket(host)
        self._store = dist.TCPStore(
            host, self._listener.getsockname()[1], None, True, timeout=datetime.timedelta(seconds=30),
            wait_for_workers=False, master_listen_fd=self._listener.fileno(),
        )  # fmt: skip
        # One device for every channel: a device is a listening socket and an event loop thread.
        # Bound to the address we were given, not whatever the hostname resolves to.
        self._device = dist.ProcessGroupGloo.create_device(hostname=host)
        self._creating: dict[str, threading.Lock] = {}

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.worker_id, self.host, self._store.port)

    def _group(self, channel: Channel, rank: int, timeout_s: float):
        with self._lock:
            self._check_open(channel)
            creating = self._creating.setdefault(channel.name, threading.Lock())
        # One rendezvous per channel and side, however many transfers start on it at once.
        with creating:
            with self._lock:
                self._check_open(channel)
                entry = self._open.get(channel.name)
            if entry is not None:
                return entry[1]
            group = self._create(channel, rank, timeout_s)
            if not self._register(channel, group):
                raise TransferError(f"{channel.name} was closed while it was being built")
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
        options._devices = [self._device]
        # send/recv run on the caller's thread; the group's own thread pool only serves collectives.
        options._threads = 1
        return dist.ProcessGroupGloo(dist.PrefixStore(channel.name, store), rank, 2, options)

    def _check_tensor(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("gloo transfers take contiguous CPU tensors")

    def _run(self, channel: Channel, rank: int, tensor: torch.Tensor, timeout_s: float, tag: int) -> None:
        group = self._group(channel, rank, timeout_s)
        work = group.send([tensor], 1, tag) if rank == 0 else group.recv([tensor], 0, tag)
        work.wait(datetime.timedelta(seconds=timeout_s))

    def _release(self, channel: Channel, communicator: object | None) -> None:
        # Dropping the last reference destroys the group (its pair's socket and its thread); a
        # transfer still on it holds one until it ends.
        with self._lock:
            self._creating.pop(channel.name, None)


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
            self._check_open(channel)
            if channel.name in self._open:
                return
        self._col.init_collective_group(2, rank, backend="nccl", group_name=channel.name)
        if not self._register(channel, channel.name):
            with contextlib.suppress(Exception):
                self._col.destroy_collective_group(channel.name)
            raise TransferError(f"{channel.name} was closed while it was being built")

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

    def _release(self, channel: Channel, communicator: object | None) -> None:
        with self._lock:
            self._channel_locks.pop(channel.name, None)
            for key in [k for k in self._parked if k[0] == channel.name]:
                del self._parked[key]
        if communicator is None:  # never built, or half-built: there is nothing more to release
            return
        with contextlib.suppress(Exception):
            self._col.destroy_collective_group(channel.name)


def _listening_socket(host: str) -> socket.socket:
    """A TCP socket listening on `host` alone, on a port the OS picks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(128)
    return listener


def make_transport(backend: str, worker_id: str, host: str = "127.0.0.1") -> KVTransport:
    """The transport for `backend` ("gloo" or "nccl")."""
    if backend == "gloo":
        return GlooTransport(worker_id, host)
    if backend == "nccl":
        return NcclTransport(worker_id, host)
    raise ValueError(f"kv transfer backend must be one of {BACKENDS}, got {backend!r}")
