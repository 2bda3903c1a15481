"""Authenticated, encrypted MQTT for every MQTT client of loopcast (docs/mqtt-security.md).

One frozen config (`MqttSecurity`, the security keys of `[mqtt]`) and one function that turns it into
`aiomqtt.Client` keyword arguments (`client_options`), used by the controller, the simulated rig's
trigger listener, `loopcast control`, the demo and the in-process loop. Secrets stay in files: a config
names the password file, never the password, and the password is read at each connect, so it is in no
config, log, audit record or NWB file. `explain` turns a refused connection into one line that names the
broker, the cause and the key to check. The defaults are anonymous plain TCP (the 127.0.0.1 broker of a
development machine).
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError  # not exported by aiomqtt 2.5

REFUSED_LOGIN = {4, 5, 134, 135}   # CONNACK: bad user name or password / not authorised (MQTT 3.1.1 and 5)


class MqttSecurityError(Exception):
    """A security setting that cannot be used when connecting; the message names the key and the file."""


@dataclass(frozen=True)
class MqttSecurity:
    """Who the client is and how it talks to the broker. Empty = anonymous, plain TCP."""

    username: str = ""        # "" = anonymous
    password_file: str = ""   # a file holding the password (one line), read at each connect
    tls: bool = False         # TLS against the system's CAs; a ca_file implies TLS
    ca_file: str = ""         # PEM: the CA(s) that signed the broker's certificate
    cert_file: str = ""       # PEM client certificate (optional; with key_file)
    key_file: str = ""        # its unencrypted PEM private key

    def __post_init__(self) -> None:
        if bool(self.username) != bool(self.password_file):
            raise ValueError("username and password_file go together: set both (a login) or neither (anonymous)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together: a client certificate needs its private key")
        if self.cert_file and not self.use_tls:
            raise ValueError("a client certificate (cert_file) needs TLS: set ca_file (or tls = true)")

    @property
    def use_tls(self) -> bool:
        """Whether the connection is TLS."""
        return self.tls or bool(self.ca_file)

    def describe(self) -> str:
        """For log lines: 'TLS (CA <file>), user <name>' or 'plain TCP, anonymous'. Never the password."""
        tls = f"TLS (CA {self.ca_file or 'system'}{', client cert ' + self.cert_file if self.cert_file else ''})"
        return f"{tls if self.use_tls else 'plain TCP'}, {f'user {self.username!r}' if self.username else 'anonymous'}"


def client_options(sec: MqttSecurity) -> dict[str, Any]:
    """`aiomqtt.Client` keyword arguments for `sec`: username and password (read from its file now) and a
    TLS context; {} for anonymous plain TCP. Raises MqttSecurityError naming the key and file."""
    options: dict[str, Any] = {}
    if sec.username:
        options.update(username=sec.username, password=read_password(sec.password_file, sec.username))
    if sec.use_tls:
        options["tls_context"] = tls_context(sec)
    return options


def read_password(path: str, username: str = "") -> str:
    """The password in `path`: its one line, without the line end."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise MqttSecurityError(f"mqtt.password_file {path}: no such file") from None
    except OSError as exc:
        raise MqttSecurityError(f"mqtt.password_file {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise MqttSecurityError(f"mqtt.password_file {path}: not UTF-8 text") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password.strip():
        raise MqttSecurityError(f"mqtt.password_file {path} is empty: it must hold the password")
    if "\n" in password:
        raise MqttSecurityError(f"mqtt.password_file {path} has several lines: it must hold the password alone")
    if username and password.startswith(f"{username}:$"):
        raise MqttSecurityError(f"mqtt.password_file {path} looks like the broker's password file (user:hash): "
                                f"the client's file holds the password itself")
    return password


def tls_context(sec: MqttSecurity) -> ssl.SSLContext:
    """A verifying client context: the broker's certificate must chain to ca_file (or the system's CAs)
    and name the host; with the client certificate, if any."""
    try:
        ctx = ssl.create_default_context(cafile=sec.ca_file or None)
    except OSError as exc:   # ssl.SSLError is an OSError
        raise MqttSecurityError(f"mqtt.ca_file {sec.ca_file}: {_reason(exc)}") from None
    if sec.cert_file:
        try:
            ctx.load_cert_chain(sec.cert_file, sec.key_file, password=lambda: _encrypted_key(sec.key_file))
        except OSError as exc:
            raise MqttSecurityError(f"mqtt.cert_file {sec.cert_file}, mqtt.key_file {sec.key_file}: "
                                    f"{_reason(exc)}") from None
    return ctx


def _encrypted_key(path: str) -> str:
    raise MqttSecurityError(f"mqtt.key_file {path} is encrypted: loopcast needs an unencrypted key "
                            f"(protect it with the file's permissions, chmod 600)")


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, ssl.SSLError):
        return {"NO_CERTIFICATE_OR_CRL_FOUND": "no PEM certificate in it",
                "KEY_VALUES_MISMATCH": "the key is not the certificate's key"}.get(exc.reason or "", str(exc))
    return exc.strerror or str(exc)


def explain(exc: BaseException, host: str, port: int, sec: MqttSecurity) -> str:
    """One line for a failed or lost connection: the broker, the cause and what to check."""
    where = f"MQTT broker {host}:{port}"
    if isinstance(exc, MqttSecurityError):   # our own files, before any connection
        return f"{where}: {exc}"
    context = exc.__cause__ or exc.__context__
    if isinstance(exc, MqttConnectError) and _code(exc) in REFUSED_LOGIN:
        who = f"user {sec.username!r}" if sec.username else "an anonymous client (no mqtt.username)"
        return (f"{where} refused the login of {who}: not authorised ({exc}); check mqtt.username and the "
                f"password in mqtt.password_file")
    if isinstance(context, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        why = getattr(context, "verify_message", "") or str(exc)
        return (f"{where}: its TLS certificate is not trusted ({why}); mqtt.ca_file "
                f"({sec.ca_file or 'the system CAs'}) must hold the CA that signed it, and it must name {host}")
    if isinstance(context, ssl.SSLError) or "SSL" in str(exc):
        return (f"{where}: TLS handshake failed ({exc}); a broker that requires client certificates needs "
                f"mqtt.cert_file and mqtt.key_file signed by its CA")
    hint = ("; the broker closed the connection unanswered: if it requires client certificates, mqtt.cert_file "
            "must be one its CA signed (the TLS alert is in the 'failed to receive on socket' line logged before)"
            if sec.use_tls and "timed out" in str(exc) else "")
    return f"{where} ({sec.describe()}): {str(exc) or type(exc).__name__}{hint}"


def _code(exc: aiomqtt.MqttCodeError) -> int:
    rc: Any = exc.rc
    return int(getattr(rc, "value", rc)) if rc is not None else -1
