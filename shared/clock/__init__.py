"""The shared timeline every process stamps on: the database server's clock, measured (``offset``), kept
strictly increasing per process (``stamps``), sampled, floored and kept continuous across a change of database
server (``timeline``), and exported (``metrics``)."""
