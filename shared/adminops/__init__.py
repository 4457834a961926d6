"""The admin operations, one implementation shared by the admin command (shared/admin) and the HTTP admin API
(shared/console): consumers and teams read, created, changed, rotated, enabled, disabled and deleted, each write
recorded in the audit table. Nothing here prints, parses arguments or knows HTTP."""
