"""A real single-node Kafka (KRaft) on 127.0.0.1 for the tests: :class:`engine.verify.servers.KafkaServer`."""

from engine.verify.servers import KafkaServer
from engine.verify.servers import ServerError as KafkaServerError

__all__ = ["KafkaServer", "KafkaServerError"]
