"""Where to hook a device-model binary: ELF reading, build-id, symbols, debug info and the
per-build table (resolve, offsets.yaml)."""
