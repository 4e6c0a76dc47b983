"""`chatvla serve` as a real process: the ready line, SIGTERM draining with work in flight, start-up errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from serverkit import infer_request, obs_req, start

from chatvla.server.app import READY_PREFIX
from chatvla.v1 import policy_pb2_grpc as pb_grpc

READY = re.compile(re.escape(READY_PREFIX) + r" grpc=(\S+) http=(\S+)")


def launch(*flags: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CHATVLA_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "chatvla.cli.main", "serve", "--engine", "null", "--grpc-port", "0",
         "--http-port", "0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


async def wait_ready(proc: subprocess.Popen) -> tuple[str, str]:
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
    m = READY.match(line)
    assert m, f"no ready line: {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
    return m.group(1), m.group(2)


def metric(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_sigterm_drains_in_flight_work_and_exits_zero():
    proc = launch("--engine-option", "reason_ms=800", "--max-batch", "1", "--drain-timeout-s", "20")
    try:
        grpc_addr, http_url = await wait_ready(proc)
        assert grpc_addr.startswith("127.0.0.1:") and http_url.startswith("http://127.0.0.1:")
        async with grpc.aio.insecure_channel(grpc_addr) as ch, httpx.AsyncClient(base_url=http_url) as http:
            stub = pb_grpc.PolicyStub(ch)
            assert (await http.get("/readyz")).status_code == 200
            stream = stub.Stream()
            await stream.write(start())
            assert (await stream.read()).WhichOneof("msg") == "session"
            await stream.write(obs_req(1))
            infer = asyncio.ensure_future(stub.Infer(infer_request()))

            async def depth() -> float:
                return metric((await http.get("/metrics")).text, "chatvla_queue_depth", stage="reasoning")

            # One observation computing, the other queued behind it: both are in flight.
            for _ in range(2000):
                if await depth() == 1:
                    break
                await asyncio.sleep(0.005)
            assert await depth() == 1
            proc.send_signal(signal.SIGTERM)
            for _ in range(2000):  # the signal is handled asynchronously
                r = await http.get("/readyz")
                if r.status_code != 200:
                    break
                await asyncio.sleep(0.005)
            assert r.status_code == 503 and r.json()["reason"] == "draining"
            health = health_pb2_grpc.HealthStub(ch)
            status = (await health.Check(health_pb2.HealthCheckRequest())).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Infer(infer_request())
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            chunk = await stream.read()
            assert chunk.WhichOneof("msg") == "chunk" and chunk.chunk.seq == 1
            assert (await infer).chunk.actions.data  # the queued call was answered, not dropped
            assert await stream.code() == grpc.StatusCode.UNAVAILABLE  # then told to reconnect
        rc = await asyncio.to_thread(proc.wait, 30)
        assert rc == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("transport,flag", [("gRPC", "--grpc-port"), ("HTTP", "--http-port"),
                                            ("openpi", "--openpi-port")])
async def test_port_in_use_fails_fast_with_a_message(transport, flag):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        ports = {"--grpc-port": "0", "--http-port": "0", "--openpi-port": "0", flag: str(port)}
        proc = launch(*(x for kv in ports.items() for x in kv))
        try:
            rc = await asyncio.to_thread(proc.wait, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert rc == 1
        err = proc.stderr.read()
        # The transport, the address and the flag that moves it, not a bare "[Errno 98] Address already in use".
        assert f"chatvla serve: {transport} port 127.0.0.1:{port} is already in use" in err, err
        assert f"{flag} 0 to let the OS pick a free one" in err
        assert "Traceback" not in err
        assert proc.stdout.read() == ""  # no ready line


async def test_bad_settings_exit_2():
    proc = launch("--max-batch", "0")
    rc = await asyncio.to_thread(proc.wait, 60)
    assert rc == 2 and "--max-batch" in proc.stderr.read()
