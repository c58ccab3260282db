"""The appliance service: watched inbox, durable job store, one worker, audit trail.

store.py (SQLite job store), inbox_layout.py (what in the inbox is a scan and
which case it belongs to), watcher.py (finding complete scans), worker.py (running
jobs through the pipeline seam), audit.py (the JSON-lines audit trail),
service.py (putting them together).
"""
