"""pymesh.net: trio I/O — the transport (QUIC and TCP RPC) and the UDP DHT node.

Transport modules (public names in ``rpc``, see docs/INTERFACES.md "Transport"):

* ``config``       TransportConfig
* ``tls``          self-signed Ed25519 certificates, pinned-key checks
* ``handshake``    identity proof and protocol version check on every connection
* ``conn``         Connection, RemoteError, CallContext, handler dispatch
* ``streams``      TCP byte streams (plaintext or TLS over MemoryBIO) reading into buffers
* ``tcp``          RPC over one TCP connection, multiplexed by request id
* ``quic_driver``  one aioquic connection driven by trio; ``quic_endpoint`` its UDP socket
* ``quic``         RPC over QUIC, one stream per call
* ``congestion``   the "pymesh-delay" congestion controller for aioquic
* ``rpc``          RpcNode

The frame codec is ``pymesh.proto.frames`` (no I/O); torch <-> TensorBlob conversion is
``pymesh.model.blobs`` (this package never imports torch).

Importing this package imports nothing.
"""
