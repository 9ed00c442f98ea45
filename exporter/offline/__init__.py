"""Files: opening a capture of any kind (capture: xentrace files and recordings), the recording
format ``iotrace record`` writes (recording), and the report of a capture (report)."""
