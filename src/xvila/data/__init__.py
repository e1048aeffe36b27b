"""Data: aligned clips (toy world or real video corpora), their storage, and X-VILA's training conversations."""
