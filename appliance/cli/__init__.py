"""The ``cytoedge`` command line: the entry point (main.py), what every command shares
(shared.py) and the appliance's own commands; ``export``, ``train`` and ``gui`` plug in
through the ``cytoedge.commands`` entry point, so nothing here imports them."""
