"""The command line: ``main`` (the entry point and the verb table), one module per verb (report,
serve, top, demo; the probe verbs live in ``iotrace.probes.cli``) and the argument types they
share (args)."""
