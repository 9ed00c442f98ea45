"""exporter/cli"""
