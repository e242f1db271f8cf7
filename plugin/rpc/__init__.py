"""Transports for the SPI: gRPC (``server``, ``client``, generated code in ``gen`` from proto/) and
Infrakit's JSON-RPC over a unix socket (``jsonrpc``). ``plugins.Plugins`` is what both serve."""
