"""CURVE keys and the driver's authenticator.

Runs in the driver (authenticator, server keys) and in remote workers (client
keys). Keys are ZeroMQ certificate files: ``NAME.key`` holds the public key,
``NAME.key_secret`` the public and secret keys (``phalanx keygen`` writes both).

Invariant kept: over TCP the driver accepts only peers whose public key is in
its ``authorized_keys`` directory; every other peer (no key, wrong key,
plaintext) is refused during the handshake, before any frame of theirs is
read, and the refusal is logged as a warning. A runtime that starts its own
hosts (``hosts=``, ``slurm=True``) also accepts the public keys it made for
them (:class:`RunKeys`), held in memory only: no key of such a run is ever
written to a file.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

__all__ = ["generate", "load_secret", "load_public", "Authenticator", "KeyPair", "RunKeys", "new_pair"]

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


def new_pair() -> KeyPair:
    """A fresh (public, secret) CURVE key pair, z85, in memory."""
    return zmq.curve_keypair()


class RunKeys:
    """The keys a runtime makes for one run: its own pair and the public keys of the hosts it starts.

    Never written to a file; a host gets its secret over the channel that starts it.
    """

    def __init__(self, server: KeyPair) -> None:
        self.server = server
        #: public keys (z85) of the hosts this run started
        self.authorized: set[bytes] = set()

    def __repr__(self) -> str:  # never the secret
        return f"RunKeys(server={self.server[0].decode('ascii')[:8]}..., hosts={len(self.authorized)})"


class Authenticator(ThreadAuthenticator):
    """ZAP handler that accepts the CURVE keys of a directory (and those of a run) and logs refusals."""

    def __init__(self, context: zmq.Context[Any], authorized_keys: str | None,
                 run_keys: RunKeys | None = None) -> None:
        super().__init__(context, log=logging.getLogger("phalanx.auth.zap"))
        if authorized_keys is not None and not os.path.isdir(authorized_keys):
            raise ValueError(f"authorized_keys must be a directory of .key files, got {authorized_keys!r}")
        self.authorized_keys = authorized_keys
        self.run_keys = run_keys

    def start(self) -> None:
        super().start()
        if self.authorized_keys is not None:
            self.configure_curve(domain="*", location=self.authorized_keys)
        else:
            self.certs["*"] = {}
        if self.run_keys is not None:
            # The run's hosts: the same table configure_curve fills, from memory (set before any host starts).
            self.certs["*"].update(dict.fromkeys(self.run_keys.authorized, True))

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed:
            key = z85.encode(client_key).decode("ascii") if len(client_key) == 32 else repr(client_key)
            where = self.authorized_keys if self.authorized_keys is not None else "this run's host keys"
            log.warning("refused a peer: CURVE key %s... is not in %s", key[:12], where)
        return allowed, reason
