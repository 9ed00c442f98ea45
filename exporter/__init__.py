"""iotrace: every I/O request Xen HVM guests send to their emulated devices, seen from Dom0.

The package is built in floors; a floor imports only the floors below it:

* ``iotrace.core``: the event model, errors, YAML, address map, aggregator, domain names, the
  metric table and the Source protocol — what every other part speaks;
* inputs: ``iotrace.probes`` (live BCC uprobes on the device models), ``iotrace.xentrace``
  (Xen's trace records, files and live), ``iotrace.offline`` (captures, recordings, reports) and
  ``iotrace.sources`` (the registry that builds every source; replay; a remote exporter);
* sinks: ``iotrace.serve`` (the Prometheus exporter) and ``iotrace.top`` (the live view); a sink
  never imports another sink;
* ``iotrace.cli``: the verbs, the only floor that knows them all.
"""
__version__ = "0.1.0"
