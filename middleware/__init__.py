"""Distributed, lossless speculative decoding over an IoT message bus.

Architecture (one package per concern):

- ``middleware.protocol``: wire messages (frozen, validated values with their
  codecs) and the topic tree, built in one place.
- ``middleware.broker_bridge``: transports behind one ``Bus`` interface
  (MQTT 5, ZeroMQ, in-memory) and the MQTT<->ZeroMQ bridge.
- ``middleware.verifier``: the edge-server side: batching, the target-model
  engine, acceptance rules, session bookkeeping.
- ``middleware.nodes``: the device side: drafters and the device session loop.
- ``middleware.cli``: ``mw-cli`` and its subcommands.
"""

__version__ = "0.1.0"

from middleware import compat as _compat

_compat.install()  # Python 3.10: the 3.11 names from their backports (see compat.py)
