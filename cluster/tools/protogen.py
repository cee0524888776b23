"""Generate the gRPC stubs of ``proto/splitserve/v1/*.proto`` with grpcio-tools.

Owns the one recipe for the committed stubs (``make proto`` runs it; a test regenerates into a
temporary folder and compares): protoc's Python, .pyi and gRPC outputs, with the gRPC file's
import rewritten to live inside the ``splitserve.proto`` namespace. Run it as
``python -m splitserve.cluster.tools.protogen [OUT_DIR]``.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
"""Folder that holds ``splitserve/v1/*.proto`` (the -I root) and receives the stubs."""
PROTOS = ("splitserve/v1/inference.proto",)
_IMPORT_FROM = "from splitserve.v1 import "
_IMPORT_TO = "from splitserve.proto.splitserve.v1 import "


def generate(out_dir: Path = PROTO_ROOT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the stubs under ``out_dir`` (mirroring the .proto paths); returns their paths."""
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for proto in PROTOS:
        stem = out_dir / proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = stem.parent / (stem.name + suffix)
            path.write_text(path.read_text().replace(_IMPORT_FROM, _IMPORT_TO))
            written.append(path)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT
    for p in generate(out):
        print(p)
