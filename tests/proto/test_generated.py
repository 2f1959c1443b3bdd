"""The committed generated modules are exactly what grpcio-tools makes of pdserve.proto today."""

from __future__ import annotations

from pathlib import Path

from pdserve.proto.generate import HERE, OUTPUTS, generate


def test_generated_modules_are_current(tmp_path):
    fresh = generate(tmp_path)
    stale = [p.name for p in fresh if p.read_bytes() != (HERE / p.name).read_bytes()]
    assert not stale, f"{stale} differ from pdserve.proto: run `python -m pdserve.proto.generate` and commit"
    assert sorted(p.name for p in fresh) == sorted(OUTPUTS)


def test_service_shape():
    from pdserve.proto import pdserve_pb2, pdserve_pb2_grpc

    service = pdserve_pb2.DESCRIPTOR.services_by_name["Router"]
    assert {m.name for m in service.methods} == {
        "Generate",
        "Abort",
        "ClusterState",
        "Metrics",
        "SetRole",
        "Planner",
        "WorkerAction",
        "SetPolicy",
        "Overview",
    }
    assert service.methods_by_name["Generate"].server_streaming
    assert hasattr(pdserve_pb2_grpc, "RouterServicer")
    assert Path(pdserve_pb2.__file__).parent == HERE
