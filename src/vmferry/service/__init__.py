"""vmferry.service: the controller as a long-running service (``vmferry serve``): REST API, live
events, metrics, server-owned jobs; and its client, which the CLI uses in client mode."""
