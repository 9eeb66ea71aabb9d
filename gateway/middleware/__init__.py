"""The gateway's middlewares: the edge (every request) and the public API's own (keys, limits, in-flight cap)."""
