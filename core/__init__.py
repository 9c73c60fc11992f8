"""Ferry's shared core: settings, database, models, stores, queue and events.

`service/`, `worker/` and `scheduler/` meet here; this package imports none of them.
"""
