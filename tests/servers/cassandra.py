"""A real single-node Cassandra on 127.0.0.1 for the tests: :class:`engine.verify.servers.CassandraServer`."""

from engine.verify.servers import CassandraServer
from engine.verify.servers import ServerError as CassandraServerError

__all__ = ["CassandraServer", "CassandraServerError"]
