"""Source rewrites applied while lowering; one rewrite per module, each a callable ``(inputs, source) -> source``."""
