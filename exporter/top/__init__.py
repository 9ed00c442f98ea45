"""The live view (a sink): snapshots of the sources (snapshot), filters, the frame of columns and
deltas (frame), the rows model (model), the fields table (columns), the table's lines (table), the
keys (keys), the curses screen (screen) and batch text (batch)."""
