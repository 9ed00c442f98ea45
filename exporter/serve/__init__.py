"""exporter/serve"""
