"""Authenticated, encrypted MQTT (realtime/wire/mqtt_security.py, docs/mqtt-security.md).

Mosquitto runs here with a password file (mosquitto_passwd) and a TLS listener whose certificates are made
in the test (openssl): a CA and the broker's certificate, a second CA that signed nothing of the broker's,
and client certificates from each. Checked: the right login over TLS round-trips a message; a wrong password
and an untrusted certificate are refused with one clear line (and as a UserError by `loopcast control`); a
controller configured through [mqtt] connects and publishes its status, and one refused stays disarmed and
retries until the password file is right; the password is in no file of a closed-loop run (logs, saved
config, audit log, session record, NWB file). Skipped where mosquitto, mosquitto_passwd or openssl is missing.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from loopcast.app import UserError
from loopcast.broker import MosquittoBroker, find_mosquitto, free_port
from loopcast.config import load_toml
from loopcast.control import send_control
from loopcast.realtime.control.controller import Controller, ControllerConfig, MqttConfig
from loopcast.realtime.control.interlocks import InterlockConfig
from loopcast.realtime.metrics import Metrics, MetricsConfig
from loopcast.realtime.wire.mqtt_security import (
    MqttSecurity,
    MqttSecurityError,
    client_options,
    explain,
    read_password,
)
from loopcast.settings import load_settings

pytestmark = pytest.mark.timeout(60)

USER = "rig0"
PASSWORD = f"pw-{uuid.uuid4().hex}"     # grepped for in every file a run leaves
TIMEOUT = 10.0


def _tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).is_file()),
                                       None)
    if found is None:
        pytest.skip(f"{name} not installed: the MQTT auth and TLS tests need it (apt install mosquitto openssl)")
    return found


# --- certificates and the broker ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """PEM files: `ca` signed the broker's `server` certificate and `client`; `other_ca` signed only `rogue`."""

    root: Path

    def crt(self, name: str) -> str:
        return str(self.root / f"{name}.crt")

    def key(self, name: str) -> str:
        return str(self.root / f"{name}.key")


def _openssl(root: Path, *args: str) -> None:
    subprocess.run([_tool("openssl"), *args], cwd=root, check=True, capture_output=True)


def _new_ca(root: Path, name: str) -> None:
    _openssl(root, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=loopcast test {name}")


def _new_cert(root: Path, name: str, ca: str, ext: str) -> None:
    (root / f"{name}.ext").write_text(ext + "\n")
    _openssl(root, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(root, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    _new_ca(root, "ca")
    _new_ca(root, "other_ca")
    _new_cert(root, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _new_cert(root, "client", "ca", "extendedKeyUsage=clientAuth")
    _new_cert(root, "rogue", "other_ca", "extendedKeyUsage=clientAuth")
    return Pki(root)


class SecureMosquitto(MosquittoBroker):
    """Mosquitto with a password file and no anonymous access, on one TLS listener (client certificates
    required if `require_certificate`)."""

    kind = "mosquitto-secure"

    def __init__(self, passwords: Path, pki: Pki, require_certificate: bool = False) -> None:
        super().__init__(binary=find_mosquitto())
        self.passwords, self.pki, self.require_certificate = passwords, pki, require_certificate

    def config_text(self) -> str:
        lines = [f"listener {self.port} {self.host}", f"cafile {self.pki.crt('ca')}",
                 f"certfile {self.pki.crt('server')}", f"keyfile {self.pki.key('server')}",
                 f"require_certificate {str(self.require_certificate).lower()}",
                 "allow_anonymous false", f"password_file {self.passwords}", "persistence false",
                 "log_dest stderr", "log_type error"]
        if os.geteuid() == 0:   # as root, mosquitto would switch to the user `mosquitto`, who cannot read tmp files
            lines.append("user root")
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def passwords(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The broker's password file (user:hash), made by mosquitto_passwd."""
    path = tmp_path_factory.mktemp("broker") / "passwords"
    path.touch()
    subprocess.run([_tool("mosquitto_passwd"), "-b", str(path), USER, PASSWORD], check=True, capture_output=True)
    return path


def _start(passwords: Path, pki: Pki, require_certificate: bool = False) -> SecureMosquitto:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: the MQTT auth and TLS tests need a real broker")
    broker = SecureMosquitto(passwords, pki, require_certificate)
    broker.start()
    return broker


@pytest.fixture(scope="module")
def tls_broker(passwords: Path, pki: Pki) -> Iterator[SecureMosquitto]:
    broker = _start(passwords, pki)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def mtls_broker(passwords: Path, pki: Pki) -> Iterator[SecureMosquitto]:
    broker = _start(passwords, pki, require_certificate=True)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The clients' password files: the right password and a wrong one (mode 600, as on a rig)."""
    root = tmp_path_factory.mktemp("secrets")
    files = {"right": root / "mqtt.password", "wrong": root / "wrong.password"}
    files["right"].write_text(PASSWORD + "\n")
    files["wrong"].write_text("not-the-password\n")
    for f in files.values():
        f.chmod(0o600)
    return files


def login(pki: Pki, password_file: Path, ca: str = "ca", client: str = "") -> MqttSecurity:
    return MqttSecurity(username=USER, password_file=str(password_file), ca_file=pki.crt(ca),
                        cert_file=pki.crt(client) if client else "", key_file=pki.key(client) if client else "")


def overrides(broker: SecureMosquitto, sec: MqttSecurity) -> list[str]:
    """-s overrides of [mqtt] for this broker and login."""
    return [f'mqtt.host="{broker.host}"', f"mqtt.port={broker.port}", f'mqtt.username="{sec.username}"',
            f'mqtt.password_file="{sec.password_file}"', f'mqtt.ca_file="{sec.ca_file}"']


async def round_trip(broker: SecureMosquitto, sec: MqttSecurity, timeout: float = TIMEOUT) -> bytes:
    topic = f"loopcast/test-{uuid.uuid4().hex[:8]}/echo"
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-{uuid.uuid4().hex[:8]}", timeout=timeout,
                              **client_options(sec)) as c:
        await c.subscribe(topic, qos=1)
        await c.publish(topic, b"hello", qos=1)
        async with asyncio.timeout(TIMEOUT):
            async for msg in c.messages:
                return bytes(msg.payload)
    raise AssertionError("no message")


async def refusal(broker: SecureMosquitto, sec: MqttSecurity) -> str:
    """explain() of the error a connection with `sec` fails with."""
    with pytest.raises(aiomqtt.MqttError) as info:
        await round_trip(broker, sec, timeout=3.0)
    return explain(info.value, broker.host, broker.port, sec)


# --- config and files, no broker -------------------------------------------------------------------------------
def test_defaults_stay_local_anonymous_and_plain() -> None:
    cfg = load_settings()
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("127.0.0.1", 1883)
    assert cfg.mqtt.security == cfg.controller.mqtt.security == MqttSecurity()
    assert client_options(cfg.mqtt.security) == {}


def test_the_security_keys_reach_the_controller_and_only_the_file_path_is_saved(tmp_path: Path,
                                                                                  secrets: dict[str, Path]) -> None:
    from loopcast.settings import new_run_dir
    sets = [f'mqtt.username="{USER}"', f'mqtt.password_file="{secrets["right"]}"', "mqtt.tls=true",
            f'paths.runs="{tmp_path}"']
    cfg = load_settings(overrides=sets)
    assert cfg.controller.mqtt.security == cfg.mqtt.security == MqttSecurity(USER, str(secrets["right"]), tls=True)
    path = new_run_dir(cfg, "x") / "config.toml"
    saved = load_toml(path)
    assert saved["mqtt"]["password_file"] == str(secrets["right"]) and "security" not in saved["controller"]["mqtt"]
    assert PASSWORD not in path.read_text()


def test_a_missing_password_file_stops_the_commands_before_they_connect(tmp_path: Path) -> None:
    """`loopcast controller` and `sim` check the files before they start (app.mqtt_security), `loopcast control`
    when it connects; the demo refuses a login with its own anonymous broker."""
    from loopcast import app
    from loopcast.demo import start_demo_broker
    cfg = load_settings(overrides=[f'mqtt.username="{USER}"', f'mqtt.password_file="{tmp_path / "none"}"'])
    with pytest.raises(UserError, match=r"^mqtt\.password_file .*/none: no such file$"):
        app.mqtt_security(cfg)
    with pytest.raises(UserError, match=r"^MQTT broker 127\.0\.0\.1:1883: mqtt\.password_file .*: no such file$"):
        asyncio.run(send_control(cfg, "arm"))
    with pytest.raises(UserError, match='set mqtt.broker = "external"'):
        start_demo_broker(cfg)


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"), (b"", "is empty"), (b"\n", "is empty"), (b"a\nb\n", "has several lines"),
    (f"{USER}:$7$101$abc==\n".encode(), "looks like the broker's password file"), (b"\xff\xfe", "not UTF-8"),
    ("dir", "cannot read it (Is a directory)")])
def test_password_file_problems_name_the_key_and_the_file(tmp_path: Path, content: bytes | str | None,
                                                          expected: str) -> None:
    path = tmp_path / "mqtt.password"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(MqttSecurityError, match=r"^mqtt\.password_file ") as info:
        client_options(MqttSecurity(USER, str(path)))
    assert expected in str(info.value) and str(path) in str(info.value)


def test_the_password_is_the_file_s_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    for text in (f"{PASSWORD}\n", f"{PASSWORD}\r\n", PASSWORD):
        path.write_text(text, newline="")
        assert read_password(str(path), USER) == PASSWORD


def test_tls_file_problems_name_the_key_and_the_file(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    _openssl(tmp_path, "genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-aes256",
             "-pass", "pass:x", "-out", "encrypted.key")
    cases = [(MqttSecurity(ca_file=str(tmp_path / "none.crt")), "mqtt.ca_file", "no such file"),
             (MqttSecurity(ca_file=str(junk)), "mqtt.ca_file", "no PEM certificate in it"),
             (MqttSecurity(ca_file=pki.crt("ca"), cert_file=pki.crt("client"), key_file=pki.key("rogue")),
              "mqtt.cert_file", "the key is not the certificate's key"),
             (MqttSecurity(ca_file=pki.crt("ca"), cert_file=pki.crt("client"),
                           key_file=str(tmp_path / "encrypted.key")), "mqtt.key_file", "is encrypted")]
    for sec, key, expected in cases:
        with pytest.raises(MqttSecurityError) as info:
            client_options(sec)
        assert str(info.value).startswith(key) and expected in str(info.value), str(info.value)


@pytest.mark.parametrize("kwargs, expected", [
    ({"username": USER}, "username and password_file go together"),
    ({"password_file": "/x"}, "username and password_file go together"),
    ({"ca_file": "/ca", "cert_file": "/c"}, "cert_file and key_file go together"),
    ({"cert_file": "/c", "key_file": "/k"}, "needs TLS")])
def test_incomplete_settings_are_refused_when_the_config_loads(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        MqttSecurity(**kwargs)


# --- against Mosquitto -----------------------------------------------------------------------------------------
def test_the_right_login_over_tls_round_trips_a_message(tls_broker: SecureMosquitto, pki: Pki,
                                                         secrets: dict[str, Path]) -> None:
    assert asyncio.run(round_trip(tls_broker, login(pki, secrets["right"]))) == b"hello"


def test_a_wrong_password_is_refused_with_one_clear_line(tls_broker: SecureMosquitto, pki: Pki,
                                                          secrets: dict[str, Path]) -> None:
    where = f"MQTT broker 127.0.0.1:{tls_broker.port}"
    line = asyncio.run(refusal(tls_broker, login(pki, secrets["wrong"])))
    assert line.startswith(f"{where} refused the login of user '{USER}': not authorised") and "\n" not in line
    assert "mqtt.password_file" in line
    anonymous = asyncio.run(refusal(tls_broker, MqttSecurity(ca_file=pki.crt("ca"))))
    assert anonymous.startswith(f"{where} refused the login of an anonymous client (no mqtt.username)")
    cfg = load_settings(overrides=overrides(tls_broker, login(pki, secrets["wrong"])))
    with pytest.raises(UserError, match=f"^{where} refused the login of user '{USER}'"):
        asyncio.run(send_control(cfg, "arm", timeout_s=2))


def test_an_untrusted_broker_certificate_is_refused_with_one_clear_line(tls_broker: SecureMosquitto, pki: Pki,
                                                                        secrets: dict[str, Path]) -> None:
    sec = login(pki, secrets["right"], ca="other_ca")
    line = asyncio.run(refusal(tls_broker, sec))
    assert line.startswith(f"MQTT broker 127.0.0.1:{tls_broker.port}: its TLS certificate is not trusted (")
    assert f"mqtt.ca_file ({pki.crt('other_ca')})" in line and "\n" not in line
    cfg = load_settings(overrides=overrides(tls_broker, sec))
    with pytest.raises(UserError, match="its TLS certificate is not trusted"):
        asyncio.run(send_control(cfg, "arm", timeout_s=2))


def test_client_certificates_signed_by_the_broker_s_ca_only(mtls_broker: SecureMosquitto, pki: Pki,
                                                            secrets: dict[str, Path],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Over TLS 1.3 the broker refuses a client certificate after the handshake, without a CONNACK: aiomqtt
    times out, paho logs the TLS alert, and the line says what to check."""
    assert asyncio.run(round_trip(mtls_broker, login(pki, secrets["right"], client="client"))) == b"hello"
    for sec in (login(pki, secrets["right"], client="rogue"), login(pki, secrets["right"])):
        caplog.clear()
        line = asyncio.run(refusal(mtls_broker, sec))
        assert line.startswith(f"MQTT broker 127.0.0.1:{mtls_broker.port} (TLS (CA {pki.crt('ca')}"), line
        assert "mqtt.cert_file must be one its CA signed" in line and "\n" not in line
        assert "failed to receive on socket: [SSL: " in caplog.text   # paho's line, with the alert


def _controller(broker: SecureMosquitto, sec: MqttSecurity, armed: bool = False) -> tuple[Controller, str]:
    rig = f"rig-{uuid.uuid4().hex[:8]}"
    cfg = ControllerConfig(forecasts=f"tcp://127.0.0.1:{free_port()}", heartbeat_s=0.2,
                           mqtt=MqttConfig(host=broker.host, port=broker.port, rig=rig, client_id=f"ctl-{rig}",
                                           reconnect_s=0.2, security=sec),
                           interlocks=InterlockConfig(armed_at_start=armed))
    metrics = Metrics("controller-test", MetricsConfig(enabled=False))
    return Controller(cfg, np.array([0, 1]), np.array([2, 3]), metrics), rig


async def _online_status(broker: SecureMosquitto, sec: MqttSecurity, rig: str) -> dict[str, Any]:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"obs-{rig}", **client_options(sec)) as c:
        await c.subscribe(f"loopcast/{rig}/status", qos=1)
        async with asyncio.timeout(TIMEOUT):
            async for msg in c.messages:
                status = json.loads(msg.payload)
                if status.get("online"):
                    return dict(status)
    raise AssertionError("no status")


def test_a_controller_configured_with_auth_and_tls_publishes_its_status(tls_broker: SecureMosquitto, pki: Pki,
                                                                        secrets: dict[str, Path]) -> None:
    sec = login(pki, secrets["right"])
    controller, rig = _controller(tls_broker, sec)

    async def session() -> dict[str, Any]:
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        try:
            await asyncio.wait_for(controller.ready.wait(), TIMEOUT)
            return await _online_status(tls_broker, sec, rig)
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT)

    status = asyncio.run(session())
    assert status["online"] and not status["armed"]


def test_a_refused_controller_stays_disarmed_retries_and_connects_once_the_password_is_right(
        tls_broker: SecureMosquitto, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The password file is read at each connect: missing, then wrong, then right, the controller retries
    (disarmed, each cause logged in one line) and gets in once it is right, still disarmed."""
    password_file = tmp_path / "mqtt.password"
    controller, _ = _controller(tls_broker, login(pki, password_file), armed=True)

    def lost() -> float:
        value = controller.metrics.registry.get_sample_value("loopcast_errors_total", {"kind": "mqtt_connection"})
        return value or 0.0

    async def session() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        try:
            for least, content in ((2, "wrong\n"), (4, PASSWORD + "\n")):
                async with asyncio.timeout(TIMEOUT):
                    while lost() < least:
                        await asyncio.sleep(0.05)
                assert not controller.interlocks.armed and not controller.ready.is_set()
                password_file.write_text(content)
            await asyncio.wait_for(controller.ready.wait(), TIMEOUT)
            assert not controller.interlocks.armed   # an operator arms it again
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT)

    with caplog.at_level(logging.ERROR, logger="loopcast.realtime.control.controller"):
        asyncio.run(session())
    lines = [r.getMessage() for r in caplog.records if "broker connection lost" in r.getMessage()]
    where = f"MQTT broker 127.0.0.1:{tls_broker.port}"
    assert "DISARMED" in lines[0] and f"{where}: mqtt.password_file {password_file}: no such file" in lines[0]
    assert any(f"{where} refused the login of user '{USER}': not authorised" in line for line in lines[2:])
    delays = [float(line.rsplit("retrying in ", 1)[1].split()[0]) for line in lines[1:]]
    assert delays == [min(0.2 * 2 ** k, 10.0) for k in range(1, len(delays) + 1)]   # backoff from reconnect_s


# --- the secret in no file of a run ----------------------------------------------------------------------------
def _nwb_strings(path: Path) -> str:
    """Every string dataset and attribute of an HDF5 (NWB) file, compressed or not."""
    import h5py  # type: ignore[import-untyped]
    out: list[str] = []

    def visit(_: str, obj: Any) -> None:
        out.extend(str(v) for v in obj.attrs.values())
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "OSU":
            out.append(str(obj[()]))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return "\n".join(out)


@pytest.mark.timeout(300)
def test_the_password_is_in_no_file_of_a_closed_loop_run(loop_setup: tuple[Path, list[str]],
                                                         tls_broker: SecureMosquitto, pki: Pki,
                                                         secrets: dict[str, Path], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The closed loop (sim, pipeline, controller, trigger listener) over auth + TLS, its session record
    exported to NWB, then `loopcast control` against a controller: no file left, no log line, no output holds
    the password; the saved configs hold the password file's path."""
    from loopcast.cli import main
    from loopcast.inprocess import run_loop
    from loopcast.settings import new_run_dir
    run = tmp_path / "run"
    sets = [*loop_setup[1], *overrides(tls_broker, login(pki, secrets["right"])), f'rig.name="s{uuid.uuid4().hex[:6]}"',
            f'endpoints.frames="tcp://127.0.0.1:{free_port()}"', f'endpoints.forecasts="tcp://127.0.0.1:{free_port()}"',
            "sim.n_frames=30", "sim.speed=25", "pipeline.max_frames=30", "pipeline.forecast.wait_subscribers=2",
            "pipeline.forecast.wait_timeout_s=20", "controller.policy.level=-1.0", 'controller.policy.mode="above"',
            "controller.interlocks.min_interval_s=0.3", "controller.interlocks.max_forecast_age_s=2.0",
            *(f"metrics.{p}=0" for p in ("sim", "run", "controller"))]
    cfg = load_settings(overrides=sets)
    with caplog.at_level(logging.DEBUG):
        out = run_loop(cfg, timeout_s=90, run_dir=new_run_dir(cfg, "loop", str(run)))
        assert out.triggers and out.sim.triggers_received > 0    # every MQTT client of the loop got in
        assert main(["session", "export-nwb", str(run)]) == 0
        argv = [a for s in sets for a in ("-s", s)]
        assert asyncio.run(_control_a_controller(cfg, run, main, argv)) == 0
    saved = [load_toml(run / d / "config.toml") for d in (".", "controller", "control")]
    assert all(c["mqtt"]["password_file"] == str(secrets["right"]) for c in saved)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert run / "session.nwb" in files and run / cfg.controller.audit.file in files
    holding = [str(p) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert not holding, f"the password is written in {holding}"
    seen = capsys.readouterr()
    assert PASSWORD not in _nwb_strings(run / "session.nwb") + caplog.text + seen.out + seen.err


async def _control_a_controller(cfg: Any, run: Path, main: Any, argv: list[str]) -> int:
    """`loopcast control arm` (the console command, in a thread; run directory <run>/control) against a
    controller running here (run directory <run>/controller)."""
    from loopcast import app
    from loopcast.settings import new_run_dir
    controller = app.build_controller(cfg, Metrics("controller", MetricsConfig(enabled=False)),
                                      app.open_recording(cfg), new_run_dir(cfg, "controller", str(run / "controller")))
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    try:
        await asyncio.wait_for(controller.ready.wait(), TIMEOUT)
        code = await asyncio.to_thread(main, ["control", "arm", *argv, "--run-dir", str(run / "control")])
        assert controller.interlocks.armed
        return int(code)
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
