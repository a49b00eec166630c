"""Transports behind one :class:`~middleware.broker_bridge.bus.Bus` interface.

- ``bus``: the interface, :class:`BusMessage`, :class:`Will`, :class:`Subscription`.
- ``client``: the reconnecting client base of the network transports.
- ``mqtt``: MQTT 5 over a broker (Mosquitto).
- ``sharded``: one bus over several independent brokers (a fleet split by device).
- ``zmq``, ``zmq_wire``: ZeroMQ without a broker (verifier ROUTER, device DEALER).
- ``bridge``: relays between an MQTT bus and a ZeroMQ bus.
- ``factory``: build the configured transport.

No broker semantics live here: those come from Mosquitto (``middleware.mosquitto``
starts one for the demo and the tests; ``tests/unit/membus.py`` is the unit tests'
in-process double).
"""
