"""Process lifecycle: bind both transports, load and warm the engine, report ready, drain on SIGTERM.

Order matters for operators: the ports are bound first (so a port clash fails in milliseconds, and
liveness probes answer during a long model load), readiness turns on only after warm-up, and one
line on stdout announces both addresses. On SIGTERM readiness goes off first (load balancers stop
sending), admitted observations are answered, open streams are ended with UNAVAILABLE so robots
reconnect elsewhere, and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from typing import TextIO

from chatvla.engines.base import Engine, EngineInfo
from chatvla.engines.loader import EngineLoadError, load_engine
from chatvla.server.auth import TokenFileError, TokenStore
from chatvla.server.card import model_card
from chatvla.server.compute import ComputeConfig, available_cores, compute_executor
from chatvla.server.errors import Code, ServeError
from chatvla.server.info import model_info_proto
from chatvla.server.messages import ReasoningPolicy
from chatvla.server.metrics import Metrics
from chatvla.server.scheduler import Scheduler, SchedulerConfig
from chatvla.server.settings import ServerSettings
from chatvla.server.state import ServerState
from chatvla.server.transports.grpc_service import GrpcServer, start_grpc
from chatvla.server.transports.http import HttpServer, start_http
from chatvla.server.transports.openpi import OpenpiServer, start_openpi

log = logging.getLogger("chatvla.server")

READY_PREFIX = "chatvla-serve ready:"


def scheduler_config(s: ServerSettings) -> SchedulerConfig:
    return SchedulerConfig(
        limits=s.limits,
        compute=ComputeConfig(
            max_batch=s.max_batch,
            max_wait_s=s.max_wait_ms / 1e3,
            expert_max_batch=s.expert_max_batch or s.max_batch,
            expert_max_wait_s=(s.max_wait_ms if s.expert_max_wait_ms is None else s.expert_max_wait_ms) / 1e3,
        ),
        max_queue=s.max_queue,
        max_sessions=s.max_sessions,
        max_in_flight=s.max_in_flight,
        deadline_s=s.deadline_ms / 1e3,
        reasoning=default_reasoning(s, None),
        zero_noise=s.noise == "zero",
    )


def default_reasoning(s: ServerSettings, info: EngineInfo | None) -> ReasoningPolicy:
    """The reasoning policy of sessions that do not ask for their own: the flags where either is set,
    else the one the model was trained to follow (`info.reasoning_refresh`): a model whose expert
    follows text written once per instruction need not decode on every observation, one trained on
    each observation's own text needs it to."""
    if s.reasoning_every_n is not None or s.reasoning_every_seconds is not None or info is None:
        return ReasoningPolicy(every_n=s.reasoning_every_n or 1, every_seconds=s.reasoning_every_seconds or 0.0)
    n, secs = info.reasoning_refresh
    return ReasoningPolicy(every_n=n, every_seconds=secs)


def _load(model: str, engine: str, options: dict, threads: int) -> Engine:
    """Load on the compute thread, with torch's pool sized before the model's first operation."""
    if engine != "null":  # the null engine needs no torch
        import torch

        torch.set_num_threads(threads)
    return load_engine(model, engine, **options)


class ServerApp:
    """One serving process. `engine` may be given directly (tests, benchmarks); otherwise it is
    loaded from `settings.model` / `settings.engine`."""

    def __init__(self, settings: ServerSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics()
        self.config = scheduler_config(settings)
        tokens = TokenStore.from_file(settings.tokens_file) if settings.tokens_file else None
        self.state = ServerState(self.metrics, settings.limits, self.config.reasoning, tokens=tokens)
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None
        self.openpi: OpenpiServer | None = None
        self._shut_down: asyncio.Future | None = None
        # Every call into the model (load, warm-up, serving) runs on this one thread: torch gives each
        # calling thread its own OpenMP team, and two teams on the same cores slow every call down.
        self._compute = compute_executor()

    @property
    def grpc_address(self) -> str:
        assert self.grpc is not None
        host = self.settings.host
        return f"[{host}]:{self.grpc.port}" if ":" in host else f"{host}:{self.grpc.port}"

    @property
    def http_url(self) -> str:
        assert self.http is not None
        host = self.settings.http_host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.settings.tls else 'http'}://{host}:{self.http.port}"

    @property
    def openpi_url(self) -> str:
        assert self.openpi is not None
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{'wss' if self.settings.tls else 'ws'}://{host}:{self.openpi.port}"

    def ready_line(self) -> str:
        info = self.state.model_info
        model = f" model={info.model_id} engine={info.engine} profile={info.profile.name}" if info else ""
        openpi = f" openpi={self.openpi_url}" if self.openpi is not None else ""
        return f"{READY_PREFIX} grpc={self.grpc_address} http={self.http_url}{openpi}{model}"

    async def start(self) -> None:
        """Bind, load, warm up, turn readiness on. Raises on any failure (after cleaning up)."""
        s = self.settings
        if not s.http_is_loopback and self.state.tokens is None:
            log.warning("HTTP listens on %s without tokens: anyone who can reach it can drive the model", s.http_host)
        if not s.host_is_loopback and not s.tls:
            ports = "gRPC and openpi" if s.openpi_port is not None else "gRPC"
            if self.state.tokens is not None:
                log.warning("%s listen on %s without TLS: bearer tokens and observations travel in clear; "
                            "set --tls-cert/--tls-key", ports, s.host)
            else:
                log.warning("%s listen on %s without TLS or tokens: observations travel in clear and anyone "
                            "who can reach it can drive the model", ports, s.host)
        from collections.abc import Awaitable
        from typing import Any

        async def bind(transport: str, flags: tuple[str, str], host: str, port: int, starting: Awaitable[Any]) -> Any:
            """Start a transport. `[Errno 98] Address already in use` names no port: a failure to bind is
            re-raised naming the transport, its address and the flag that moves it."""
            import errno
            import socket

            try:
                return await starting
            except (OSError, RuntimeError) as e:  # grpc raises RuntimeError("Failed to bind to address ...")
                code, reason = getattr(e, "errno", None), getattr(e, "strerror", None) or str(e)
                if code is None and "bind" in str(e).lower():  # gRPC says no more: ask the OS why
                    try:
                        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                            probe.bind((host, port))
                    except OSError as why:
                        code, reason = why.errno, why.strerror or str(why)
                elif code not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES) and not isinstance(
                    e, socket.gaierror
                ):
                    raise  # not about the address (TLS, a bad openpi mapping, ...)
                address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                host_flag, port_flag = flags
                if code == errno.EADDRINUSE:
                    raise OSError(f"{transport} port {address} is already in use (another server running?); pick "
                                  f"another with {port_flag} PORT, or {port_flag} 0 to let the OS pick a free one"
                                  ) from e
                raise OSError(f"{transport} cannot listen on {address}: {reason}; check {host_flag} and {port_flag} "
                              f"({port_flag} 0 lets the OS pick a free port)") from e

        try:
            tls_grpc = (s.tls_key.read_bytes(), s.tls_cert.read_bytes()) if s.tls_key and s.tls_cert else None
            self.grpc = await bind("gRPC", ("--host", "--grpc-port"), s.host, s.grpc_port,
                                   start_grpc(self.state, s.host, s.grpc_port, tls=tls_grpc))
            tls_http = (s.tls_cert, s.tls_key) if s.tls_key and s.tls_cert else None
            self.http = await bind("HTTP", ("--http-host", "--http-port"), s.http_host, s.http_port,
                                   start_http(self.state, s.http_host, s.http_port, tls=tls_http,
                                              drain_s=s.drain_timeout_s))
            if s.openpi_port is not None:
                self.openpi = await bind("openpi", ("--host", "--openpi-port"), s.host, s.openpi_port, start_openpi(
                    self.state, s.host, s.openpi_port, mapping=s.openpi_mapping, tls=tls_http,
                    default_prompt=s.openpi_default_prompt,
                ))
            loop = asyncio.get_running_loop()
            threads = s.compute_threads or available_cores()
            if self.engine is None:
                t0 = time.perf_counter()
                self.engine = await loop.run_in_executor(
                    self._compute, lambda: _load(s.model, s.engine, s.engine_options, threads)
                )
                log.info("engine %s loaded %s in %.1f s", s.engine, s.model, time.perf_counter() - t0)
            if self.openpi is not None:
                self.openpi.bind(self.engine.info)  # MappingError (a RuntimeError) if the mapping does not fit
            engine = self.engine
            engine.set_threads(threads)  # one compute team: the model's pool owns these cores
            log.info("model compute on one thread with %d cores", threads)
            if s.warmup:
                await loop.run_in_executor(self._compute, engine.warmup)
            self.config = replace(self.config, reasoning=default_reasoning(s, engine.info))
            self.state.reasoning = self.config.reasoning
            scheduler = Scheduler(engine, self.config, self.metrics, executor=self._compute)
            await scheduler.start()
            self.state.pipeline = scheduler
            self.state.model_info = model_info_proto(self.engine.info, s.limits, self.config.reasoning)
            info = self.engine.info
            self.state.model_card = model_card(s.model, info.engine, info.model_id)
            self.metrics.set_build(info.model_id, info.engine, info.profile.name)
            await self.state.set_ready(True)
        except BaseException:
            await self._close_transports(grace=0)
            raise

    async def shutdown(self) -> bool:
        """Drain and stop. True if every admitted observation was answered within the timeout."""
        if self._shut_down is not None:
            return await self._shut_down  # a second call waits for the first
        self._shut_down = asyncio.get_running_loop().create_future()
        drained = await self._shutdown()
        self._shut_down.set_result(drained)
        return drained

    async def _shutdown(self) -> bool:
        s = self.settings
        self.state.draining = True
        await self.state.set_ready(False)
        drained = True
        pipeline = self.state.pipeline
        t0 = time.monotonic()
        if pipeline is not None:
            pipeline.stop_accepting()
            drained = await pipeline.drain(s.drain_timeout_s)
            log.info("drained in %.2f s (complete: %s)", time.monotonic() - t0, drained)
        if self.grpc is not None:
            self.grpc.servicer.end_streams(ServeError(Code.UNAVAILABLE, "server is shutting down; reconnect"))
        await self._close_transports(grace=max(1.0, s.drain_timeout_s - (time.monotonic() - t0)))
        if pipeline is not None:
            await pipeline.close()
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(self._compute, self.engine.close)
        self._compute.shutdown(wait=False)
        return drained

    async def _close_transports(self, grace: float) -> None:
        if self.grpc is not None:
            await self.grpc.server.stop(grace)
        if self.http is not None:
            await self.http.stop()
        if self.openpi is not None:
            await self.openpi.stop()


async def serve(settings: ServerSettings, *, engine: Engine | None = None, out: TextIO = sys.stdout) -> int:
    """Run until SIGTERM/SIGINT; the exit code of `chatvla serve`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)  # second signal: the operator does not want to wait for the drain
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        app = ServerApp(settings, engine)
        await app.start()
    except (EngineLoadError, TokenFileError, OSError, RuntimeError) as e:
        print(f"chatvla serve: {e}", file=sys.stderr)
        return 1
    print(app.ready_line(), file=out, flush=True)
    await stop.wait()
    log.info("signal received: draining")
    drained = await app.shutdown()
    if not drained:
        log.warning("drain timeout: some observations were not answered")
    return 0


def run(settings: ServerSettings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(serve(settings))
