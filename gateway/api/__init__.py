"""The public API (mounted at ``/api/external`` by ``gateway.app``), one module per resource: customers, requests."""
