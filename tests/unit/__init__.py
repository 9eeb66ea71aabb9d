"""Unit tests of pure logic: no broker, no database, no processes."""
