"""A real single-node Cassandra on 127.0.0.1 for the tests: :class:`engine.servers.CassandraServer`."""

from engine.servers import CassandraServer
from engine.servers import ServerError as CassandraServerError

__all__ = ["CassandraServer", "CassandraServerError"]
