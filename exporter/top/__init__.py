"""exporter/top"""
