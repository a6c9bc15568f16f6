"""The wire: messages, their codec, sockets and endpoints.

Runs in the driver and in every worker. Nothing in this package knows about
jobs or actors; it only guarantees that what crosses a socket is a tagged
msgpack message (never pickle), that every socket is made with the same
options, and that endpoints are private by default.
"""

from .endpoints import Endpoints, local_endpoints, tcp_endpoints

__all__ = ["Endpoints", "local_endpoints", "tcp_endpoints"]
