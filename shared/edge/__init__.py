"""The edge: the HTTP framework, consumer keys, errors as clients see them."""
