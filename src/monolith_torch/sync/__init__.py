"""Parameter sync: a trainer publishes full snapshots and deltas of its tables and dense model as files.

``format`` is the file format (folders of Arrow IPC files and a JSON
manifest), ``exporter`` the trainer's side (``DeltaExporter``), ``replica``
the serving side (``Replica``: applies publications in order).
"""
