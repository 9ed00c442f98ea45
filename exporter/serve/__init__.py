"""The Prometheus exporter (a sink): the collector over the sources (collector), its column-wise
series layout (layout), the text format (exposition), the rendering thread (render), the HTTP(S)
server (server), the exporter-toolkit web config (webconfig) and the ``exporter:`` config section
(settings)."""
