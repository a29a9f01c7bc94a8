"""A real single-node Kafka (KRaft) on 127.0.0.1 for the tests: :class:`engine.servers.KafkaServer`."""

from engine.servers import KafkaServer
from engine.servers import ServerError as KafkaServerError

__all__ = ["KafkaServer", "KafkaServerError"]
