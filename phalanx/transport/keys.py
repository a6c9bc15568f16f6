"""CURVE keys and the driver's authenticator.

Runs in the driver (authenticator, server keys) and in remote workers (client
keys). Keys are ZeroMQ certificate files: ``NAME.key`` holds the public key,
``NAME.key_secret`` the public and secret keys (``phalanx keygen`` writes both).

Invariant kept: over TCP the driver accepts only peers whose public key is in
its ``authorized_keys`` directory; every other peer (no key, wrong key,
plaintext) is refused during the handshake, before any frame of theirs is
read, and the refusal is logged as a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

__all__ = ["generate", "load_secret", "load_public", "Authenticator", "KeyPair"]

log = logging.getLogger("phalanx.auth")

KeyPair = tuple[bytes, bytes]  # (public, secret), z85


def generate(directory: str, name: str) -> tuple[str, str]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``directory``; return their paths."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return str(public), str(secret)


def load_secret(path: str) -> KeyPair:
    """The (public, secret) pair in a ``.key_secret`` file."""
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def load_public(path: str) -> bytes:
    """The public key in a ``.key`` or ``.key_secret`` file."""
    public, _ = zmq.auth.load_certificate(path)
    return public


class Authenticator(ThreadAuthenticator):
    """ZAP handler that accepts the CURVE keys of a directory and logs refusals."""

    def __init__(self, context: zmq.Context[Any], authorized_keys: str) -> None:
        super().__init__(context, log=logging.getLogger("phalanx.auth.zap"))
        if not os.path.isdir(authorized_keys):
            raise ValueError(f"authorized_keys must be a directory of .key files, got {authorized_keys!r}")
        self.authorized_keys = authorized_keys

    def start(self) -> None:
        super().start()
        self.configure_curve(domain="*", location=self.authorized_keys)

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed:
            key = z85.encode(client_key).decode("ascii") if len(client_key) == 32 else repr(client_key)
            log.warning("refused a peer: CURVE key %s... is not in %s", key[:12], self.authorized_keys)
        return allowed, reason
