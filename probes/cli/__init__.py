"""The probe verbs: probe-info (where the hook goes), snoop (one line per request), record (a
recording), standin (run the stand-in device model); common holds what snoop and record share."""
