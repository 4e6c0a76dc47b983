"""Client-side balancing and failover (issue 7, items 4 and 7).

Three layers: the balancer on its own (spread, stickiness, failover order, DNS re-resolution with a
fake resolver); the gRPC client against scripted in-process servers (a dead replica, a draining one,
one whose address swallows connections, DNS answers that change); and the whole robot side on wall
time against two real `chatvla serve --engine null` processes, one of which is killed (SIGKILL) or
drained (SIGTERM) mid-episode. Loopback only; time limits only stop a hung test."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from concurrent import futures

import grpc
import numpy as np
import pytest

from chatvla.client.balancing import Balancer, Endpoint, parse_target, rank, system_resolver
from chatvla.client.config import BackoffConfig, ClientConfig, SessionConfig
from chatvla.client.connection import (
    ChunkReply,
    ConnectionChanged,
    ObservationRequest,
    PolicyConnection,
    PolicyEvent,
    RequestFailed,
    Unavailable,
)
from chatvla.client.policy_client import GrpcPolicyClient
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

FAST = BackoffConfig(initial_s=0.01, max_s=0.05, jitter=0.2)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeResolver:
    """host -> IPs, changeable between calls; an entry that is an exception is raised."""

    def __init__(self, answers: dict[str, object]) -> None:
        self.answers = dict(answers)
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        a = self.answers.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(a, BaseException):
            raise a
        return list(a)  # type: ignore[arg-type]


def eps(*addresses: str) -> list[Endpoint]:
    return [Endpoint(a, a) for a in addresses]


# ---- targets -------------------------------------------------------------------------------------
def test_targets_parse():
    assert parse_target("dns:///svc.ns.svc.cluster.local:50051").host == "svc.ns.svc.cluster.local"
    assert parse_target("dns:replicas:7").port == 7
    assert parse_target("dns://8.8.8.8/replicas:7").host == "replicas"
    assert parse_target("dns:///[::1]:9").host == "::1"
    for plain in ("10.0.0.1:50051", "localhost:50051", "[::1]:50051", "unix:/tmp/s", "ipv4:1.2.3.4:5"):
        assert parse_target(plain).host is None  # one replica, handed to gRPC as is
    for bad in ("dns:///noport", "dns:///host:", "dns:///host:99999", "dns://auth-only", ""):
        with pytest.raises(ValueError):
            parse_target(bad)
    with pytest.raises(ValueError):
        ClientConfig(addresses=("dns:///noport",))
    with pytest.raises(ValueError):
        ClientConfig(addresses=("127.0.0.1:1",), balance="random")


def test_dns_targets_expand_to_every_record_and_plain_ones_pass_through():
    res = FakeResolver({"replicas": ["10.0.0.2", "10.0.0.1", "10.0.0.2", "fd00::3"]})
    b = Balancer(["dns:///replicas:50051", "backup:50051", "dns:///10.9.9.9:1"], "arm", resolver=res)
    got = b.endpoints()
    assert [e.address for e in got] == [
        "10.0.0.1:50051", "10.0.0.2:50051", "[fd00::3]:50051", "backup:50051", "10.9.9.9:1"
    ]
    assert {e.server_name for e in got[:3]} == {"replicas"}  # TLS checks the name, not the IP
    assert got[3].server_name is None and got[4].server_name is None
    assert res.calls == ["replicas"]  # IP literals and plain host:port are not resolved here
    assert "127.0.0.1" in system_resolver("localhost", 50051)


# ---- spreading and stickiness --------------------------------------------------------------------
def test_robots_spread_evenly_and_each_sticks_to_its_replica():
    replicas = eps("10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051")
    first = {f"robot-{i}": rank(f"robot-{i}", replicas)[0].address for i in range(3000)}
    counts = Counter(first.values())
    assert len(counts) == 3 and all(900 <= n <= 1100 for n in counts.values()), counts
    # The same robot picks the same replica every time, whatever order the replicas are listed in.
    assert all(rank(r, replicas[::-1])[0].address == a for r, a in list(first.items())[:200])
    a = Balancer(["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"], "robot-7")
    b = Balancer(["10.0.0.3:50051", "10.0.0.1:50051", "10.0.0.2:50051"], "robot-7")
    assert a.pick() == b.pick() and a.pick().address == first["robot-7"]


def test_adding_or_removing_a_replica_moves_only_the_robots_it_concerns():
    three = eps("a:1", "b:1", "c:1")
    robots = [f"r{i}" for i in range(2000)]
    before = {r: rank(r, three)[0].address for r in robots}
    after_removal = {r: rank(r, eps("a:1", "c:1"))[0].address for r in robots}
    assert all(after_removal[r] == before[r] for r in robots if before[r] != "b:1")
    after_add = {r: rank(r, [*three, *eps("d:1")])[0].address for r in robots}
    moved = [r for r in robots if after_add[r] != before[r]]
    assert all(after_add[r] == "d:1" for r in moved) and 400 <= len(moved) <= 600  # about 1/4


def test_a_dead_replicas_robots_spread_over_the_survivors():
    targets = ["a:1", "b:1", "c:1", "d:1"]
    moved_to: Counter = Counter()
    for i in range(2000):
        b = Balancer(targets, f"r{i}", clock=FakeClock())
        home = b.pick()
        if home.address != "a:1":
            continue
        b.failed(home)
        moved_to[b.pick().address] += 1
    assert set(moved_to) == {"b:1", "c:1", "d:1"} and min(moved_to.values()) > 0.25 * sum(moved_to.values())


def test_failover_order_skips_cooling_replicas_then_round_robins():
    clock = FakeClock()
    b = Balancer(["a:1", "b:1", "c:1"], "robot", cooldown_s=10, clock=clock)
    order = [e.address for e in b.ranked()]
    first = b.pick()
    assert first.address == order[0]
    b.succeeded(first)
    b.failed(first)
    clock.t += 1
    second = b.pick()
    assert second.address == order[1]
    b.failed(second)
    clock.t += 1
    assert b.pick().address == order[2]
    b.failed(b.pick())
    clock.t += 1
    # Everything failed recently: retry the one that failed longest ago.
    assert [e.address for e in b.failover_order()] == order
    clock.t += 8.5  # the first one's cool-down is over, the others' not yet
    assert b.pick().address == order[0]
    b.succeeded(b.pick())
    assert b.failover_order()[0].address == order[0]


def test_ordered_policy_keeps_the_configured_order():
    b = Balancer(["z:1", "a:1", "m:1"], "robot", policy="ordered", clock=FakeClock())
    assert [e.address for e in b.failover_order()] == ["z:1", "a:1", "m:1"]
    b.failed(b.pick())
    assert b.pick().address == "a:1"


def test_dns_is_re_resolved_on_every_pick_and_the_last_answer_survives_a_failed_lookup():
    clock = FakeClock()
    res = FakeResolver({"replicas": ["10.0.0.1", "10.0.0.2"]})
    b = Balancer(["dns:///replicas:50051"], "robot", resolver=res, clock=clock)
    home = b.pick()
    b.succeeded(home)
    assert home.address in {"10.0.0.1:50051", "10.0.0.2:50051"}
    # The replica dies; Kubernetes takes it out of the answer and starts another one.
    b.failed(home)
    res.answers["replicas"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    res.answers["replicas"].remove(home.address.split(":")[0])
    nxt = b.pick()
    assert nxt.address != home.address and nxt.address.split(":")[0] in res.answers["replicas"]
    assert len(res.calls) == 2
    assert {e.address.split(":")[0] for e in b.endpoints()} == set(res.answers["replicas"])
    # A DNS failure keeps the last answer rather than stranding the robot.
    res.answers["replicas"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert {e.address.split(":")[0] for e in b.endpoints()} == {"10.0.0.1", "10.0.0.2", "10.0.0.3"} - {
        home.address.split(":")[0]
    }
    # Never resolved at all: the target goes to gRPC as is (and fails there like a dead address).
    lone = Balancer(["dns:///nowhere:50051"], "robot", resolver=FakeResolver({}))
    assert lone.pick().address == "dns:///nowhere:50051"


# ---- the gRPC client against scripted replicas -------------------------------------------------
class Replica:
    """A scripted Policy server on one loopback IP (127.0.0.x), so that several share a port and one
    DNS name can stand for all of them."""

    def __init__(self, h, profile, host: str, port: int = 0) -> None:
        self.servicer = h.ScriptedPolicy(profile)
        self.host = host
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_PolicyServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot bind {host}:{port}")
        self.server.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        self.servicer.stop.set()
        self.server.stop(grace=0).wait(5)


@pytest.fixture
def replicas(toy, h):
    """Two scripted replicas on 127.0.0.2 and 127.0.0.3, same port."""
    made: list[Replica] = []
    for _ in range(20):
        first = Replica(h, toy, "127.0.0.2")
        try:
            made = [first, Replica(h, toy, "127.0.0.3", first.port)]
            break
        except (OSError, RuntimeError):
            first.kill()
    assert made, "could not bind two loopback replicas on one port"
    yield made
    for r in made:
        r.kill()


def obs(profile, tick: int) -> ObservationRequest:
    images = {c.name: np.zeros((c.height, c.width, 3), np.uint8) for c in profile.cameras}
    return ObservationRequest(tick=tick, images=images, state=np.zeros(profile.state_dim, np.float32))


class Events:
    def __init__(self, client: GrpcPolicyClient) -> None:
        self.client = client
        self.all: list[PolicyEvent] = []

    def of(self, kind: type) -> list:
        self.all.extend(self.client.poll())
        return [e for e in self.all if isinstance(e, kind)]


def make_client(profile, addresses, robot_id: str, **kw) -> GrpcPolicyClient:
    resolver = kw.pop("resolver", None)
    kw.setdefault("backoff", FAST)
    config = ClientConfig(addresses=tuple(addresses), robot_id=robot_id, **kw)
    return GrpcPolicyClient(config, SessionConfig(profile, instruction="stack the cups"), resolver=resolver)


def robots_for(replicas: list[Endpoint], home: str, n: int = 1) -> list[str]:
    """`n` robot ids whose first choice is `home`."""
    ids = (f"arm-{i}" for i in range(10_000))
    return [r for r in ids if rank(r, replicas)[0].address == home][:n]


def robot_for(replicas: list[Endpoint], home: str) -> str:
    return robots_for(replicas, home)[0]


class Recorder:
    def __init__(self) -> None:
        self.records: list = []

    def on_tick(self, record) -> None:
        self.records.append(record)


def test_a_robot_fails_over_through_a_dns_name_and_sees_new_answers(toy, h, replicas):
    a, b = replicas
    res = FakeResolver({"policy.test": ["127.0.0.2", "127.0.0.3"]})
    target = f"dns:///policy.test:{a.port}"
    robot = robot_for(Balancer([target], resolver=res).endpoints(), a.address)
    client = make_client(toy, [target], robot, resolver=res)
    try:
        client.wait_connected(10)
        assert client.address == a.address
        ev = Events(client)
        client.submit(obs(toy, 0))
        h.wait_for(lambda: ev.of(ChunkReply), what="a chunk from the first replica")
        # The replica dies and leaves the DNS answer.
        res.answers["policy.test"] = ["127.0.0.3"]
        a.kill()
        h.wait_for(lambda: client.connected and client.address == b.address, timeout=10, what="failover")
        assert res.calls.count("policy.test") >= 2
        before = len(ev.of(ChunkReply))
        client.submit(obs(toy, 10))
        h.wait_for(lambda: len(ev.of(ChunkReply)) > before, what="a chunk from the second replica")
        assert b.servicer.log.observations[-1].tick == 10 and b.servicer.log.starts[0].robot_id == robot
        ups = [e for e in ev.of(ConnectionChanged) if e.connected]
        assert [e.address for e in ups] == [a.address, b.address]
        downs = [e for e in ev.of(ConnectionChanged) if not e.connected]
        assert [e.address for e in downs] == [a.address]
    finally:
        client.close()


def test_a_healthy_replica_keeps_its_robot_and_a_draining_one_sends_it_on_at_once(toy, h, replicas):
    a, b = replicas
    robot = robot_for(eps(a.address, b.address), b.address)
    client = make_client(toy, [a.address, b.address], robot, failover_cooldown_s=30)
    try:
        client.wait_connected(10)
        ev = Events(client)
        for t in range(5):
            client.submit(obs(toy, t))
            h.wait_for(lambda t=t: len(ev.of(ChunkReply)) > t, what=f"chunk {t}")
        assert client.address == b.address and b.servicer.log.streams == 1 and a.servicer.log.streams == 0
        # b starts draining: it refuses the next observation in-band with UNAVAILABLE but keeps the
        # stream open. The client moves on that refusal, not when b finally closes the stream.
        b.servicer.script = lambda o: h.Reply(
            "error", code=pb.UNAVAILABLE, message="server is draining; reconnect to another replica"
        )
        refused = client.submit(obs(toy, 5))
        h.wait_for(lambda: client.address == a.address and client.connected, timeout=10, what="failover")
        failed = next(e for e in ev.of(RequestFailed) if e.seq == refused)
        assert isinstance(failed.error, Unavailable)
        client.submit(obs(toy, 6))
        h.wait_for(lambda: any(e.seq > refused for e in ev.of(ChunkReply)), what="a chunk from a")
        assert a.servicer.log.observations[-1].tick == 6 and a.servicer.log.streams == 1
    finally:
        client.close()


def test_a_replica_address_that_swallows_connections_costs_the_connect_timeout_not_20_s(toy, h, replicas):
    """No RST, no answer (a pod IP that went dark): gRPC alone would wait 20 s to give up."""
    live = replicas[0]
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(0)
    port = sink.getsockname()[1]
    dark = f"127.0.0.1:{port}"
    fillers = []
    for _ in range(4):  # fill the accept queue (never accepted): further SYNs are dropped
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    client = make_client(toy, [dark, live.address], "arm", balance="ordered", connect_timeout_ms=400)
    try:
        t0 = time.monotonic()
        client.wait_connected(10)
        assert client.address == live.address and time.monotonic() - t0 < 8
    finally:
        client.close()
        for c in fillers:
            c.close()
        sink.close()


# ---- end to end: two real servers, robots on wall time -----------------------------------------
class Tee(PolicyConnection):
    """Passes everything through and keeps a copy of every event, with the wall time it was polled."""

    def __init__(self, inner: GrpcPolicyClient) -> None:
        self.inner = inner
        self.events: list[tuple[float, PolicyEvent]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self.inner.start()

    def submit(self, request: ObservationRequest) -> int:
        return self.inner.submit(request)

    def poll(self) -> list[PolicyEvent]:
        out = self.inner.poll()
        now = time.monotonic()
        with self._lock:
            self.events.extend((now, e) for e in out)
        return out

    def close(self) -> None:
        self.inner.close()

    def of(self, kind: type) -> list:
        with self._lock:
            return [e for _t, e in self.events if isinstance(e, kind)]


def active_sessions(http_url: str) -> float:
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("chatvla_active_sessions"):
                return float(line.split()[-1])
    raise AssertionError("no chatvla_active_sessions in /metrics")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_robots_move_off_a_dying_replica_without_executing_a_stale_action(how, h):
    from chatvla.cli.server_process import start_server
    from chatvla.client.executor import ChunkExecutor, ExecutorConfig
    from chatvla.client.fakes import FakeRobot
    from chatvla.client.runtime import ControlLoop, TickRecord
    from chatvla.client.safety import SafetyFilter, Verdict
    from chatvla.profiles import get_profile

    profile = get_profile("franka_joint")  # 15 Hz, chunks of 16 ticks (1.07 s)
    # Each server caps its reasoning at a different token count, so every chunk says who computed it.
    servers: list = [None, None]
    boot_errors: list[BaseException] = []

    def boot(i: int) -> None:
        try:
            servers[i] = start_server(
                ["--engine", "null", "--engine-option", f"max_reasoning_tokens={5 + i}"], timeout_s=90
            )
        except BaseException as e:
            boot_errors.append(e)

    threads = [threading.Thread(target=boot, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    loops: list[ControlLoop] = []
    tees: list[Tee] = []
    try:
        assert all(servers), f"a server did not start: {boot_errors}"
        addresses = [s.grpc_address for s in servers]
        tokens_of = {s.grpc_address: 5 + i for i, s in enumerate(servers)}
        # Two robots per replica (chosen with the balancer's own ranking, since the ports are random).
        replicas = eps(*addresses)
        robots = robots_for(replicas, addresses[0], 2) + robots_for(replicas, addresses[1], 2)
        # A slow first reconnect (1.2 s, longer than what is queued) so the arm must hold meanwhile.
        backoff = BackoffConfig(initial_s=1.2, max_s=1.5, jitter=0.05)
        records: dict[str, list[TickRecord]] = {}
        fake_robots = {}
        for rid in robots:
            client = GrpcPolicyClient(
                ClientConfig(addresses=tuple(addresses), robot_id=rid, backoff=backoff),
                SessionConfig(profile, instruction="put the cup on the plate"),
            )
            tee = Tee(client)
            rec = Recorder()
            records[rid] = rec.records
            robot = fake_robots[rid] = FakeRobot(profile)
            loop = ControlLoop(
                robot, tee, ChunkExecutor(profile, ExecutorConfig(blend="replace")), SafetyFilter(profile),
                observers=[rec],
            )
            tees.append(tee)
            loops.append(loop)
            client.wait_connected(15)
            assert client.address == rank(rid, replicas)[0].address  # the predicted replica
        for loop in loops:
            loop.start()

        def chunks_from(tee: Tee, address: str) -> int:
            return sum(1 for e in tee.of(ChunkReply) if e.reasoning_tokens == tokens_of[address])

        h.wait_for(lambda: all(chunks_from(t, t.inner.address) >= 3 for t in tees), timeout=20,
                   what="3 chunks per robot")
        assert [active_sessions(s.http_url) for s in servers] == [2.0, 2.0]

        # Kill (or drain) replica 0 mid-episode.
        victim, survivor = servers
        t_kill = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
        movers, stayers = tees[:2], tees[2:]
        h.wait_for(lambda: all(t.inner.address == survivor.grpc_address and chunks_from(t, survivor.grpc_address) >= 3
                               for t in movers), timeout=20, what="the robots to move and get 3 chunks")
        time.sleep(0.3)
        for loop in loops:
            loop.stop()
        assert victim.proc.wait(30) == (-9 if how == "sigkill" else 0)
        assert active_sessions(survivor.http_url) == 4.0
    finally:
        for loop in loops:
            loop.stop()
        for t in tees:
            t.close()
        for s in servers:
            if s is not None:
                s.stop(timeout=10)

    for loop in loops:
        assert loop.error is None and not loop.running
    for rid in robots:
        recs = records[rid]
        # The loop never stalled: ticks came at the control rate throughout, including the failover.
        times = [r.time for r in recs]
        assert max(np.diff(times)) < 0.5, f"{rid}: a {max(np.diff(times)):.2f} s gap between ticks"
        # No stale action: every action the executor proposed is the row of a chunk already received
        # that belongs to exactly that tick (replace blending keeps rows intact).
        rows: dict[int, list[np.ndarray]] = {}
        for r in recs:
            for reply in r.replies:
                for i, row in enumerate(reply.actions):
                    rows.setdefault(reply.tick + i, []).append(row)
            if r.proposed is not None:
                assert any(np.allclose(r.proposed, row, atol=1e-6) for row in rows.get(r.tick, [])), (
                    f"{rid}: tick {r.tick} proposed an action that is no chunk's row for that tick"
                )
            if r.decision.verdict is Verdict.COMMAND:
                assert r.proposed is not None  # a dry queue never becomes a command
        assert fake_robots[rid].stops == 0  # the failover is shorter than the watchdog's stop

    for tee in stayers:  # sticky: never left their replica, one session for the whole episode
        assert not [e for e in tee.of(ConnectionChanged) if not e.connected]
        assert {e.reasoning_tokens for e in tee.of(ChunkReply)} == {tokens_of[survivor.grpc_address]}
    for tee, rid in zip(movers, robots[:2]):
        changes = tee.of(ConnectionChanged)
        down = next(e for e in changes if not e.connected)
        assert down.address == victim.grpc_address and isinstance(down.error, Unavailable)
        up = [e for e in changes if e.connected]
        assert up and up[-1].address == survivor.grpc_address
        # Chunks came from the victim up to the failover, and only from the survivor after it.
        replies = tee.of(ChunkReply)
        tags = [e.reasoning_tokens for e in replies]
        k = tags.index(tokens_of[survivor.grpc_address])
        assert set(tags[:k]) == {tokens_of[victim.grpc_address]} and set(tags[k:]) == {
            tokens_of[survivor.grpc_address]
        }
        # The sessions do not interleave: everything the survivor answered was sent after everything
        # the victim answered.
        assert max(e.seq for e in replies[:k]) < min(e.seq for e in replies[k:])
        # While no fresh chunk existed the queue ran dry and the arm held its last safe target.
        after = [r for r in records[rid] if r.time > t_kill]
        gap = [r for r in after if r.proposed is None]
        assert gap, "the slow reconnect should have emptied the queue"
        assert all(r.decision.verdict is Verdict.HOLD for r in gap)
        resumed = [r for r in after if r.decision.verdict is Verdict.COMMAND and r.tick > gap[-1].tick]
        assert resumed, "commands resumed from the survivor's chunks"
