"""MQTT brokers for development, tests and the zero-setup default.

Production rigs point the controller at their own broker (Mosquitto or any MQTT 3.1.1 broker).
Here we start one locally: Mosquitto as a subprocess when the binary is installed (faster, and
it is what rigs run), else amqtt embedded in-process on its own asyncio loop in a daemon thread.
Both bind 127.0.0.1 only.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

log = logging.getLogger(__name__)

BrokerKind = Literal["auto", "mosquitto", "embedded"]
MOSQUITTO_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
START_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 1.5  # amqtt 0.12 can stall in shutdown after a PUBACK mix-up


@runtime_checkable
class Broker(Protocol):
    """A running (or startable) MQTT broker reachable at `host:port`."""

    kind: str
    host: str
    port: int

    def start(self) -> Broker: ...

    def stop(self) -> None: ...

    def __enter__(self) -> Broker: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class _ContextBroker:
    """Context-manager plumbing shared by the broker implementations."""

    kind = "none"
    host = "127.0.0.1"
    port = 0

    def start(self) -> _ContextBroker:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _ContextBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.host}:{self.port})"


def quiet_amqtt_logging(level: int = logging.WARNING) -> None:
    """amqtt logs every connection and packet at INFO/DEBUG; keep it to warnings."""
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(level)


def _amqtt_listeners(broker: Any) -> list[asyncio.Server]:
    # amqtt has no public API for its listening servers, which we need for the port a listener
    # actually bound (bind "...:0") and to close the port first on shutdown. It keeps
    # {listener name: Server} in the private `Broker._servers`, and `Server.instance` is the
    # asyncio.Server. This is the only place that touches amqtt internals (checked with amqtt 0.12).
    servers = broker._servers.values()
    return [s.instance for s in servers if getattr(s, "instance", None) is not None]


class EmbeddedBroker(_ContextBroker):
    """amqtt broker in-process: its own event loop in a daemon thread. `port=0` picks a free port."""

    kind = "embedded"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    def start(self) -> EmbeddedBroker:
        if self._broker is not None:
            return self
        quiet_amqtt_logging()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="amqtt-broker", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            fut = asyncio.run_coroutine_threadsafe(self._start_async(), loop)
            self._broker = fut.result(timeout=START_TIMEOUT_S)
        except BaseException:
            self._stop_loop()
            raise
        self.port = int(_amqtt_listeners(self._broker)[0].sockets[0].getsockname()[1])
        log.info("embedded amqtt broker listening on %s:%d", self.host, self.port)
        return self

    async def _start_async(self) -> Any:
        from amqtt.broker import Broker as AmqttBroker  # imported lazily: ~20 packages

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        broker = AmqttBroker(config, loop=asyncio.get_running_loop())
        await broker.start()
        return broker

    def stop(self) -> None:
        if self._broker is not None and self._loop is not None:
            fut = asyncio.run_coroutine_threadsafe(self._shutdown_async(), self._loop)
            try:
                fut.result(timeout=START_TIMEOUT_S)
            except Exception as exc:  # stopping anyway; report and go on
                log.warning("embedded broker shutdown failed: %r", exc)
            log.info("embedded amqtt broker on port %d stopped", self.port)
        self._broker = None
        self._stop_loop()

    async def _shutdown_async(self) -> None:
        """Free the port at once, then let amqtt close its sessions (bounded: it can stall)."""
        for server in _amqtt_listeners(self._broker):
            server.close()
        try:
            await asyncio.wait_for(self._broker.shutdown(), SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.warning("amqtt shutdown did not finish in %.1f s; dropping its sessions", SHUTDOWN_TIMEOUT_S)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=START_TIMEOUT_S)
        if not loop.is_running():
            loop.close()


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary: PATH first, then the Debian location (/usr/sbin)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_FALLBACK_PATHS if Path(p).is_file()), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_tcp(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until `host:port` accepts a TCP connection; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s} s") from None
            time.sleep(0.02)


class MosquittoBroker(_ContextBroker):
    """Mosquitto subprocess on 127.0.0.1 with anonymous access, no persistence, unlimited queues."""

    kind = "mosquitto"

    def __init__(self, binary: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise FileNotFoundError("mosquitto binary not found on PATH or in /usr/sbin")
        self.binary, self.host, self.port = found, host, port
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int | None:
        """Mosquitto's process id while it runs (for its scheduling or a process sampler)."""
        return self._proc.pid if self._proc is not None else None

    def config_text(self) -> str:
        """The mosquitto.conf this broker runs with."""
        return "\n".join([
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            "max_queued_messages 0",  # 0 = unlimited: never drop QoS 1 messages for a slow client
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "",
        ])

    def start(self) -> MosquittoBroker:
        if self._proc is not None:
            return self
        self._dir = tempfile.TemporaryDirectory(prefix="loopcast-mosquitto-")
        fixed_port = self.port != 0
        for attempt in range(3):  # a picked port can be taken before mosquitto binds it
            if not fixed_port:
                self.port = free_port(self.host)
            try:
                proc = self._launch()
                log.info("mosquitto listening on %s:%d (pid %d)", self.host, self.port, proc.pid)
                return self
            except (RuntimeError, TimeoutError) as exc:
                err = self._kill()
                if fixed_port or attempt == 2:
                    self.stop()
                    raise RuntimeError(f"mosquitto failed to start on port {self.port}: {exc}; {err}") from exc
        raise AssertionError("unreachable")

    def _launch(self) -> subprocess.Popen[bytes]:
        assert self._dir is not None
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(self.config_text())
        errlog = open(Path(self._dir.name) / "stderr.log", "wb")
        try:
            self._proc = proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                                 stderr=errlog, stdin=subprocess.DEVNULL)
        finally:
            errlog.close()
        wait_for_tcp(self.host, self.port, START_TIMEOUT_S, proc)
        return proc

    def _kill(self) -> str:
        """Terminate the process (if any); return the tail of its stderr for error messages."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._dir is None:
            return ""
        errfile = Path(self._dir.name) / "stderr.log"
        return errfile.read_text(errors="replace")[-500:].strip() if errfile.exists() else ""

    def stop(self) -> None:
        had = self._proc is not None
        self._kill()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        if had:
            log.info("mosquitto on port %d stopped", self.port)


def start_broker(kind: BrokerKind = "auto", port: int = 0) -> Broker:
    """Start a local broker: `auto` = Mosquitto if installed, else embedded amqtt."""
    if kind not in ("auto", "mosquitto", "embedded"):
        raise ValueError(f"unknown broker kind {kind!r}; use auto, mosquitto or embedded")
    if kind == "mosquitto" or (kind == "auto" and find_mosquitto() is not None):
        return MosquittoBroker(port=port).start()
    return EmbeddedBroker(port=port).start()
