"""After a session: read a run directory's record (`data`: the audit log and the session store as one
`SessionData`), summarise it (`report`) and write it as one NWB file (`nwb`)."""
