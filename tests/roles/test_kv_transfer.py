"""KV transports between two endpoints: data arrives intact, failures raise and recover."""

from __future__ import annotations

import threading

import pytest
import torch

from pdserve.roles.kv_transfer import Channel, TransferError, make_transport, transfer_tag
from pdserve.roles.process_usage import ProcessUsage


def exchange(sender, receiver, channel, tensor, out, timeout_s=10.0):
    errors = []

    def recv():
        try:
            receiver.recv(channel, out, timeout_s)
        except Exception as e:
            errors.append(e)

    thread = threading.Thread(target=recv)
    thread.start()
    sender.send(channel, tensor, timeout_s)
    thread.join()
    assert not errors, errors


def test_gloo_moves_kv_blocks_exactly_and_recovers_after_a_timeout():
    a, b = make_transport("gloo", "a"), make_transport("gloo", "b")
    try:
        kv = torch.randn(3, 2, 5, 4, 2, 8)
        out = torch.zeros_like(kv)
        channel = Channel(a.endpoint, b.endpoint)
        exchange(a, b, channel, kv, out)
        assert torch.equal(out, kv)
        # A receiver that never shows up: the sender gives up with a TransferError.
        lonely = Channel(a.endpoint, b.endpoint, generation=1)
        with pytest.raises(TransferError, match="send on kv:a->b#1 failed"):
            a.send(lonely, kv, 1.0)
        assert a.open_channels == 1  # the failed one is closed; generation 0 stays
        with pytest.raises(TransferError, match="closed"):
            a.send(lonely, kv, 1.0)  # and never built again
        # The next generation builds fresh communicators and works.
        out.zero_()
        exchange(a, b, Channel(a.endpoint, b.endpoint, generation=2), kv * 2, out)
        assert torch.equal(out, kv * 2)
    finally:
        a.close()
        b.close()


def test_gloo_closed_channels_release_their_sockets_and_threads():
    a, b = make_transport("gloo", "a"), make_transport("gloo", "b")
    kv, out = torch.randn(3, 64), torch.zeros(3, 64)
    try:
        exchange(a, b, Channel(a.endpoint, b.endpoint), kv, out)
        start = ProcessUsage.of_this_process()
        for generation in range(1, 11):
            channel = Channel(a.endpoint, b.endpoint, generation)
            exchange(a, b, channel, kv, out)
            assert a.open_channels == b.open_channels == 2
            a.close_channel(channel)
            b.close_channel(channel)
        end = ProcessUsage.of_this_process()
        # Each channel held a socket per end, a connection to the store and a thread per end
        # (x10 here); closed, they are gone.
        assert end.open_fds <= start.open_fds + 1 and end.threads <= start.threads + 1, (start, end)
        assert a.close_peer("b") == 1 and b.close_peer("a") == 1
        assert a.open_channels == b.open_channels == 0
    finally:
        a.close()
        b.close()


def test_gloo_refuses_gpu_or_strided_tensors():
    a = make_transport("gloo", "a")
    channel = Channel(a.endpoint, a.endpoint)
    with pytest.raises(ValueError, match="contiguous CPU"):
        a.send(channel, torch.zeros(4, 4).t(), 1.0)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="one of"):
        make_transport("tcp", "a")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_moves_kv_blocks_between_gpu_actors(ray_session):
    ray = ray_session

    @ray.remote(num_gpus=1)
    class Peer:
        def __init__(self, name):
            self.t = make_transport("nccl", name)

        def endpoint(self):
            return self.t.endpoint

        def send(self, channel):
            torch.manual_seed(0)  # drawn on the CPU so both ends can rebuild the same values
            self.t.send(channel, torch.randn(4, 2, 8, 16, 2, 64).cuda(), 30.0)

        def recv(self, channel):
            out = torch.zeros(4, 2, 8, 16, 2, 64, device="cuda")
            self.t.recv(channel, out, 30.0)
            torch.manual_seed(0)
            return torch.equal(out.cpu(), torch.randn(4, 2, 8, 16, 2, 64))

    a, b = Peer.remote("a"), Peer.remote("b")
    channel = Channel(ray.get(a.endpoint.remote()), ray.get(b.endpoint.remote()))
    sent, ok = a.send.remote(channel), b.recv.remote(channel)
    ray.get(sent)
    assert ray.get(ok)


def test_gloo_concurrent_transfers_on_one_channel_arrive_at_the_right_receiver():
    # The disaggregated path starts several requests' transfers on one channel at once, and the
    # receiver may post them in another order than the sender: tags keep them apart.
    a, b = make_transport("gloo", "a"), make_transport("gloo", "b")
    channel = Channel(a.endpoint, b.endpoint)
    tensors = {f"req-{i}": torch.full((i + 1, 64), float(i)) for i in range(6)}
    outs = {rid: torch.zeros_like(t) for rid, t in tensors.items()}
    errors = []

    def run(fn, *args):
        try:
            fn(*args)
        except Exception as e:
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(b.recv, channel, outs[rid], 10.0, transfer_tag(rid)))
        for rid in reversed(tensors)
    ] + [
        threading.Thread(target=run, args=(a.send, channel, t, 10.0, transfer_tag(rid)))
        for rid, t in tensors.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    b.close()
    assert not errors, errors
    assert all(torch.equal(outs[rid], tensors[rid]) for rid in tensors)
