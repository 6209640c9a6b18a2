"""Where bytes come from on this node: one `Store` interface (base.py), one module per backend."""
