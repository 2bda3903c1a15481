"""`loopcast control`: send arm / disarm / stop / reset to a rig's controller and show its status."""
from __future__ import annotations

import asyncio
import getpass
import json
import socket
import time
from typing import Any

import aiomqtt

from loopcast.app import UserError
from loopcast.realtime.wire.codec import mqtt_topic
from loopcast.realtime.wire.mqtt_security import MqttSecurityError, client_options, explain
from loopcast.settings import LoopcastConfig


async def send_control(cfg: LoopcastConfig, command: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Publish `command` (QoS 1) on loopcast/<rig>/control; return the first status sent after it. A refused
    or lost connection is a UserError naming the broker and the cause (a refused login, an untrusted certificate)."""
    rig, m = cfg.rig.name, cfg.mqtt
    try:
        async with aiomqtt.Client(m.host, m.port, identifier=f"loopcast-cli-{time.time_ns()}",
                                  **client_options(m.security)) as c:
            await c.subscribe(mqtt_topic(rig, "status"), qos=1)
            await c.publish(mqtt_topic(rig, "control"), control_payload(command), qos=1)
            return await asyncio.wait_for(_next_status(c, command, time.time_ns()), timeout_s)
    except (aiomqtt.MqttError, MqttSecurityError) as exc:
        raise UserError(explain(exc, m.host, m.port, m.security)) from exc
    except TimeoutError:
        raise UserError(f"no status from rig {rig!r} within {timeout_s} s: is `loopcast controller` "
                        f"running against this broker?") from None


def control_payload(command: str, tool: str = "loopcast control") -> bytes:
    """The JSON control message: the command and who sent it, from which tool (recorded in the controller's
    audit log)."""
    return json.dumps({"command": command, "sender": f"{_user()}@{_host()} ({tool})"}).encode()


def _user() -> str:
    try:
        return getpass.getuser() or "unknown"
    except Exception:   # no login name, no $USER, no passwd entry (containers)
        return "unknown"


def _host() -> str:
    try:
        return socket.gethostname() or "unknown"
    except OSError:
        return "unknown"


async def _next_status(client: aiomqtt.Client, command: str, after_ns: int) -> dict[str, Any]:
    """The first status published after `after_ns` that reports handling `command`."""
    async for msg in client.messages:
        status = json.loads(msg.payload)
        handled = (status.get("last_control") or {}).get("command") == command
        if handled and int(status.get("heartbeat_ns", 0)) >= after_ns:
            return status
    raise UserError("status stream ended")
