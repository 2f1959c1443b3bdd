"""`ExpertCollective`: the all-to-all an expert-parallel group moves token rows with.

One interface, two backends, as the KV transfer has (roles/kv_transfer.py): `gloo` for CPU
tensors and `nccl` for CUDA tensors, each a torch process group of its own over all ranks of the
group (not torch.distributed's single default group, which a worker may need for something
else). Ranks rendezvous through a TCPStore the group's owner serves on its host (`StoreAddress`);
every wait is bounded by `timeout_s`, so a dead rank raises `CollectiveError` in the others
instead of hanging them.
"""

from __future__ import annotations

import abc
import datetime
import socket
from dataclasses import dataclass

import torch


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer died or the group is being torn down."""


@dataclass(frozen=True)
class StoreAddress:
    """Where the group's rendezvous store listens, and the key prefix of this group's incarnation."""

    host: str
    port: int
    prefix: str


class RendezvousStore:
    """The TCPStore server a group's ranks meet at, bound to `host` alone (loopback by default)."""

    def __init__(self, prefix: str, host: str = "127.0.0.1", timeout_s: float = 60.0) -> None:
        import torch.distributed as dist

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        # The store's server would listen on every interface whatever `host` says; it gets a
        # socket bound to `host` instead (as GlooTransport does).
        self._store = dist.TCPStore(
            host, self._listener.getsockname()[1], None, True, timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False, master_listen_fd=self._listener.fileno(),
        )  # fmt: skip
        self.address = StoreAddress(host, self._store.port, prefix)
        self._listener.detach()  # the store owns the descriptor now and closes it

    def close(self) -> None:
        """Stops serving the rendezvous (ranks already joined keep their group)."""
        self._store = None


class ExpertCollective(abc.ABC):
    """Rank `rank` of `size`: variable-size all-to-all of row tensors (dim 0 split by rank)."""

    backend = ""

    def __init__(self, rank: int, size: int, timeout_s: float) -> None:
        self.rank = rank
        self.size = size
        self.timeout_s = timeout_s

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where tensors passed to `all_to_all` live."""

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Sends rows send[sum(send_counts[:r]) : ...] to rank r; returns the rows every rank sent
        here, rank 0's first. `recv_counts[r]`: how many rows rank r sends here."""
        out = torch.empty((sum(recv_counts), *send.shape[1:]), dtype=send.dtype, device=send.device)
        try:
            work = self._group.alltoall_base(out, send.contiguous(), list(recv_counts), list(send_counts))
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise CollectiveError(
                f"expert-parallel all-to-all on rank {self.rank}/{self.size} failed: {e}"
            ) from e
        return out

    def close(self) -> None:
        """Drops the process group (its sockets and threads)."""
        self._group = None


def _client_store(address: StoreAddress, timeout_s: float):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(address.host, address.port, None, False, timeout=timeout)
    return dist.PrefixStore(address.prefix, store)


class GlooCollective(ExpertCollective):
    """CPU tensors over a Gloo process group bound to the store's host."""

    backend = "gloo"

    def __init__(self, address: StoreAddress, rank: int, size: int, timeout_s: float) -> None:
        import torch.distributed as dist

        super().__init__(rank, size, timeout_s)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = datetime.timedelta(seconds=timeout_s)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address.host)]
        options._threads = 1
        try:
            self._group = dist.ProcessGroupGloo(_client_store(address, timeout_s), rank, size, options)
        except RuntimeError as e:
            raise CollectiveError(f"rank {rank}/{size} could not join the expert-parallel group: {e}") from e

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class NcclCollective(ExpertCollective):
    """CUDA tensors over an NCCL process group; the store only carries its unique id."""

    backend = "nccl"

    def __init__(self, address: StoreAddress, rank: int, size: int, timeout_s: float, device: str) -> None:
        import torch.distributed as dist

        super().__init__(rank, size, timeout_s)
        self._device = torch.device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=timeout_s)
        try:
            self._group = dist.ProcessGroupNCCL(_client_store(address, timeout_s), rank, size, options)
        except RuntimeError as e:
            raise CollectiveError(f"rank {rank}/{size} could not join the expert-parallel group: {e}") from e

    @property
    def device(self) -> torch.device:
        return self._device


def make_collective(
    backend: str, address: StoreAddress, rank: int, size: int, timeout_s: float, device: str = "cpu"
) -> ExpertCollective:
    """The collective for `backend` ("gloo" or "nccl")."""
    if backend == "gloo":
        return GlooCollective(address, rank, size, timeout_s)
    if backend == "nccl":
        return NcclCollective(address, rank, size, timeout_s, device)
    raise ValueError(f"expert_parallel.backend must be 'gloo' or 'nccl', got {backend!r}")
