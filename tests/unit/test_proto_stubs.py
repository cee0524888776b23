"""The committed gRPC stubs equal a fresh grpcio-tools generation from the .proto files."""

from __future__ import annotations

from pathlib import Path

from splitserve.cluster.tools.protogen import PROTO_ROOT, generate


def test_committed_stubs_match_fresh_generation(tmp_path: Path) -> None:
    fresh = generate(out_dir=tmp_path)
    assert fresh, "nothing was generated"
    stale = []
    for path in fresh:
        committed = PROTO_ROOT / path.relative_to(tmp_path)
        if not committed.exists() or committed.read_text() != path.read_text():
            stale.append(str(committed.relative_to(PROTO_ROOT)))
    assert not stale, f"stubs differ from the .proto; run `make proto`: {stale}"


def test_stubs_import_inside_the_namespace() -> None:
    from splitserve.proto.splitserve.v1 import inference_pb2, inference_pb2_grpc

    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert service.full_name == "splitserve.v1.InferenceService"
    assert {m.name for m in service.methods} == {
        "Generate",
        "Abort",
        "Tokenize",
        "Detokenize",
        "ListModels",
        "GetServerInfo",
        "GetLoads",
        "Embed",
    }
    assert hasattr(inference_pb2_grpc, "InferenceServiceStub")
