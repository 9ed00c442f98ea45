"""The ground floor: what every source and sink speaks.

events (the one event model: NumPy batches of ioreqs), errors (what the CLI prints as one line),
yamlfile (YAML that remembers lines), addrmap (range names for addresses), aggregate (cells of
counts, bytes and service histograms per key), domains (names and how a domain is spelled),
metrics (the one table of exported metrics), source (the Source protocol, its capabilities and
the EventSource base).
"""
