"""Deprecated: the session protocol moved to :mod:`pymesh.proto.session_wire`.

A thin re-export kept only until every importer uses the new module; delete it then.
"""

from __future__ import annotations

from pymesh.proto.session_wire import (CLOSE, ERR, FLUSH, FORWARD, INFO, MAX_BATCH, MAX_COPY_EVERY,
                                       MAX_HIDDEN_DIMS, MAX_SESSION_TOKENS, OPEN, OUT, SET_NEXT, STATS, STEP,
                                       BadRequest, NextHop, check_hidden_shape, get_bytes, get_int, get_str)

__all__ = ["CLOSE", "ERR", "FLUSH", "FORWARD", "INFO", "MAX_BATCH", "MAX_COPY_EVERY", "MAX_HIDDEN_DIMS",
           "MAX_SESSION_TOKENS", "OPEN", "OUT", "SET_NEXT", "STATS", "STEP", "BadRequest", "NextHop",
           "check_hidden_shape", "get_bytes", "get_int", "get_str"]
