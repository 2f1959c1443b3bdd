"""Regenerates `pdserve_pb2.py` / `pdserve_pb2_grpc.py` from `pdserve.proto` (needs grpcio-tools).

The generated modules import each other as `pdserve.proto.pdserve_pb2`, so the proto is compiled
from a temporary tree shaped like the package.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules into `out_dir`; returns their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp, "pdserve", "proto")
        pkg.mkdir(parents=True)
        shutil.copy(HERE / "pdserve.proto", pkg / "pdserve.proto")
        args = [
            "grpc_tools.protoc",
            f"-I{tmp}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            "pdserve/proto/pdserve.proto",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on pdserve.proto")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copy(pkg / name, out_dir / name)
    return [out_dir / name for name in OUTPUTS]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"wrote {path}")
