"""exporter/offline"""
