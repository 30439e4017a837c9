"""The lifecycle engine: makes each VM's actual state (what the driver runs) follow its desired state
(the row in Postgres). It queues work, converges one VM at a time under its lock, reconciles, collects
orphans and publishes state changes. It uses the store and the drivers and never the web layer: ``Engine``
(engine.py) is given its collaborators and assembles the parts (runner, converge, saves, reconcile, collect,
locks, publish); docs/LIFECYCLE.md, "The code"."""
