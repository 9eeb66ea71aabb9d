"""The dead-letter console: ``python -m console``, a small aiohttp app of its own to find, inspect, replay and
drop dead letters in the browser, with a dry run, roles (viewer, operator) and an audit trail.

Modules: ``__main__`` (entry point, start-up checks), ``app`` (the factory: connections, routes, middlewares in
order), ``access`` (sessions, CSRF, cross-site refusal, roles), ``keys`` (console keys and the loopback rule),
``desk`` (the one way to the dead letters, over ``worker.dead_letters``: the replay tool's own core), ``pages``
(HTML, Jinja2 with autoescape) and ``api`` (JSON). ``static/htmx.min.js`` is htmx 2.0.11 (npm ``htmx.org``,
0BSD licence), shipped in the package: the console loads nothing from elsewhere.
"""
