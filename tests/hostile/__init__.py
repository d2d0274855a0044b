"""Hostile-peer and fault tests of issue 11: real processes on loopback (tests.swarm.conftest.LocalProcs)
or in-process nodes; every loop bounded in count and time."""
