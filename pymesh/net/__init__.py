"""pymesh.net: trio I/O — the transport (QUIC and TCP RPC) and the UDP DHT node.

Transport modules (public names in ``rpc``, see docs/INTERFACES.md "Transport"):

* ``config``       TransportConfig (plain defaults; ``Settings.transport_config()`` applies PYMESH_*)
* ``clock``        Clock protocol, TrioClock (default; virtual under trio's MockClock), FakeClock
* ``tls``          self-signed Ed25519 certificates, pinned-key checks
* ``handshake``    identity proof and protocol version check on every connection
* ``conn``         Connection, RemoteError, CallContext, handler dispatch, and ConnectionHost:
                   what a connection needs from its node (RpcNode is one)
* ``streams``      byte streams reading into buffers: TCP (plaintext or TLS over MemoryBIO) and
                   AnyStream (any trio stream, e.g. an in-memory pair in tests)
* ``tcp``          RPC over one byte stream (TCP, or any stream), multiplexed by request id
* ``quic_driver``  one aioquic connection driven by trio; ``quic_endpoint`` its UDP socket
                   (connection IDs routed through register_cid / forget_cid)
* ``quic``         RPC over QUIC, one stream per call
* ``congestion``   the "pymesh-delay" congestion controller for aioquic
* ``rpc``          RpcNode (listen/connect over QUIC or TCP; connect_stream/serve_stream over any stream)

DHT modules: ``dht`` (DHTNode: UDP socket, queries, lookups, maintenance), ``dht_config``
(DHTConfig, DHTRemoteError; re-exported by ``dht``), ``dht_ops`` (what the node's components
need from it), ``dht_records`` (DHTRecords: worker records, ``node.records``),
``dht_bootstrap`` (Bootstrapper: joining and re-checking bootstrap addresses,
``node.bootstrapper``), ``dht_ratelimit``. The pure parts live in ``pymesh.proto``
(dht_core, lookup, routing, storage, bep44, backoff, dht_sim).

Errors: PeerUnavailable when the peer is unreachable, silent or gone; ConnectionClosed (a
LocalProtocolError) when this node uses a connection it closed itself.

The frame codec is ``pymesh.proto.frames`` (no I/O); torch <-> TensorBlob conversion is
``pymesh.model.blobs`` (this package never imports torch).

Importing this package imports nothing.
"""
