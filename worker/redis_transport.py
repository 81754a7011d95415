"""Kombu's Redis transport, with taking a message and recording it as unacknowledged made one step.

Stock kombu (5.7) takes a message off its list with BRPOP and records it in the `unacked` hash (what the
visibility timeout redelivers from) in a second round trip, when the message reaches the consumer. In
between, the message is nowhere but in the worker's socket buffer: if Redis dies then (its AOF already
holds the pop) or the worker does, the message is gone and nothing will ever deliver it again.

Here a Lua script pops the first message of the consumed queues and records it in `unacked` and its
index in the same step: Redis runs a script alone, and writes its effects to the AOF as one
MULTI/EXEC, so after any crash the message is either still in its queue or in `unacked`, from where
the visibility timeout delivers it again. A script cannot block, so when every queue was empty the
channel waits with a BRPOP on a key nothing writes to (IDLE_WAIT seconds) before it looks again: a
message published to idle queues waits up to that long more than with stock kombu.

Everything else (acknowledgement, rejection, the visibility timeout's restore, fanout) is kombu's.
"""

from __future__ import annotations

from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

IDLE_WAIT = 0.1  # seconds a channel waits after finding every queue empty
IDLE_KEY = "_worldspeak.idle"  # never written: BRPOP on it is a wait

# KEYS: the unacked hash, its index, then the queues in the order to try them. ARGV[1]: the time now
# (the client's clock, as kombu's restore compares with it); ARGV[2...]: "1" for each queue whose
# messages are acknowledged, "0" for one consumed without acknowledgement. Returns false, or {queue
# key, payload, 1 if recorded}; a payload that is not kombu's JSON is handed over unrecorded, as stock
# kombu does.
POP_AND_RECORD = """
for i = 3, #KEYS do
  local payload = redis.call('RPOP', KEYS[i])
  if payload and ARGV[i - 1] ~= '1' then
    return {KEYS[i], payload, 0}
  end
  if payload then
    local ok, message = pcall(cjson.decode, payload)
    local properties = ok and type(message) == 'table' and message['properties']
    local tag = type(properties) == 'table' and properties['delivery_tag']
    local delivery = type(properties) == 'table' and properties['delivery_info']
    if type(tag) ~= 'string' or type(delivery) ~= 'table' then
      return {KEYS[i], payload, 0}
    end
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    local route = cjson.encode(delivery['exchange']) .. ',' .. cjson.encode(delivery['routing_key'])
    redis.call('HSET', KEYS[1], tag, '[' .. payload .. ',' .. route .. ']')
    return {KEYS[i], payload, 1}
  end
end
return false
"""


class QoS(redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.recorded_on_pop.pop(delivery_tag, False):
            virtual.QoS.append(self, message, delivery_tag)  # already in Redis: only the local bookkeeping
        else:
            super().append(message, delivery_tag)


class Channel(redis.Channel):
    QoS = QoS
    _in_poll: Any  # kombu's: the connection polled, or None between polls
    _brpop_sent_at: float | None  # type: ignore[assignment]  # kombu declares it None, then sets a time

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            raise ValueError("worker.redis_transport does not support kombu's global_keyprefix")
        self.recorded_on_pop: dict[str, bool] = {}
        self._unacknowledged_queues: set[str] = set()  # consumed with no_ack: nothing to record
        self._waiting = False  # the command in flight is the idle wait, not a pop

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._unacknowledged_queues.add(queue)
        else:
            self._unacknowledged_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if self._waiting:
            command = ["BRPOP", IDLE_KEY, IDLE_WAIT]
        else:
            pairs = [(self._q_for_pri(queue, pri), queue) for pri in self.priority_steps for queue in queues]
            keys = [key for key, _ in pairs]
            acked = ["0" if queue in self._unacknowledged_queues else "1" for _, queue in pairs]
            command = [
                "EVAL",
                POP_AND_RECORD,
                2 + len(keys),
                self.unacked_key,
                self.unacked_index_key,
                *keys,
                time(),
                *acked,
            ]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP" if self._waiting else "EVAL")
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            if self._waiting or not reply:
                self._waiting = not self._waiting  # after a wait, look again; after an empty look, wait
                raise Empty()
            key, payload, recorded = reply
            message = loads(bytes_to_str(payload))
            if recorded:
                self.recorded_on_pop[message["properties"]["delivery_tag"]] = True
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            self.connection._deliver(message, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


class Transport(redis.Transport):
    Channel = Channel
