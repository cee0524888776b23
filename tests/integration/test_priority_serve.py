"""``priority`` over HTTP and gRPC: taken by a server started with ``--scheduling-policy
priority``, refused naming the field by an fcfs one."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest

from splitserve.proto.splitserve.v1 import inference_pb2 as pb
from splitserve.proto.splitserve.v1 import inference_pb2_grpc as pb_grpc
from tests.utils import tiny_server


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_priority_over_http_and_grpc(tiny_model_dir: Path, policy: str) -> None:
    with tiny_server(tiny_model_dir, grpc_port=0, engine={"scheduling_policy": policy}) as srv:
        bodies = [("/v1/completions", {"prompt": "Once upon", "max_tokens": 3}),
                  ("/v1/chat/completions",
                   {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})]
        for path, body in bodies:
            for prio in (-3, 0, 7):
                r = httpx.post(f"{srv.http_url}{path}",
                               json={"model": "tiny", **body, "priority": prio}, timeout=60)
                if policy == "priority" or prio == 0:
                    assert r.status_code == 200, r.text
                else:
                    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            req = pb.GenerateRequest(text="Once upon", sampling_params=pb.SamplingParams(
                max_tokens=3, priority=4))
            if policy == "priority":
                assert list(stub.Generate(req, timeout=60))[-1].HasField("complete")
            else:
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.Generate(req, timeout=60))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details().startswith("priority")
