"""Transports behind one :class:`~middleware.broker_bridge.bus.Bus` interface.

- ``bus``: the interface, :class:`BusMessage`, :class:`Will`, :class:`Subscription`.
- ``mqtt``: MQTT 5 over a broker (Mosquitto).
- ``sharded``: one bus over several independent brokers (a fleet split by device).
- ``memory``: in-process broker for unit tests and the no-broker demo fallback.
- ``embedded``: start a real Mosquitto (tests, demo).
- ``factory``: build the configured transport.
"""
